"""Names of the messages and records the ServerApp and the ClientApp exchange.

faces -> [site: front end -> X_p -> recognizer] -> shared weights -> [server: aggregate]

Train messages hold "arrays" (the shared weights: every key is "<module>.<state-dict key>"),
"config" (stage, lr, local-epochs, ...), and in stage 2 the read-only "frozen-generator" (keys
"generator.*", the same scheme as the stage-1 arrays).  Replies hold "arrays" with exactly the
keys received and "metrics" with `num-examples`.  Margin heads (class centres of a site's
identities) never appear in any record.  After training, "evaluate.privacy" asks each site to
attack its own faces; the reply is one MetricRecord "privacy" of numbers only.
"""

STAGE1 = "stage1"
STAGE2 = "stage2"

ARRAYS = "arrays"
CONFIG = "config"
FROZEN_GENERATOR = "frozen-generator"
NUM_EXAMPLES = "num-examples"

# Which modules are shared (aggregated) in each stage; the head is never shared.
SHARED_MODULES = {STAGE1: ("generator", "recognizer"), STAGE2: ("recognizer",)}

PRIVACY_ACTION = "privacy"
PRIVACY_MESSAGE_TYPE = f"evaluate.{PRIVACY_ACTION}"
PRIVACY_RECORD = "privacy"
