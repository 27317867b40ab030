"""Names of the messages and records the ServerApp and the ClientApp exchange.

faces -> [site: front end -> X_p -> recognizer] -> shared weights -> [server: aggregate]

Train messages hold "arrays" (the shared weights: every key is "<module>.<state-dict key>"),
"config" (stage, lr, local-epochs, ...), and in stage 2 the read-only "frozen-generator" (keys
"generator.*", the same scheme as the stage-1 arrays).  Replies hold "arrays" with exactly the
keys received and "metrics" with `num-examples`.  Margin heads (class centres of a site's
identities) never appear in any record.  After training, "evaluate.privacy" asks each site to
attack its own faces; the reply is one MetricRecord "privacy" of numbers only.

Pooled stage 2 (run config stage2-mode = "pooled"): "query.pooled_upload" asks a site for one
chunk of its training faces protected with the frozen global g ("frozen-generator"; "config":
upload-id, chunk, chunk-images, copies).  The reply holds "protected" (key "xp": float16
(n, 3, 112, 112), each the float16 rounding of a protect() output), "pseudonyms" (key "labels":
int64 (n,), random per-site identity tokens made on the site) and the MetricRecord "upload".
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

STAGE2_MODES = ("federated", "pooled")
UPLOAD_ACTION = "pooled_upload"      # Flower: an action is a Python identifier
UPLOAD_MESSAGE_TYPE = f"query.{UPLOAD_ACTION}"
PROTECTED = "protected"
PROTECTED_KEY = "xp"
PSEUDONYMS = "pseudonyms"
PSEUDONYMS_KEY = "labels"
UPLOAD_RECORD = "upload"
# what a site says about its upload: this chunk's index, how many chunks it has in all, images
# of its own in the chunk, protected copies of each, distinct label tokens it uses, and its
# random site token (names its spool on the server, stable across restarts of both sides)
UPLOAD_METRICS = ("chunk", "chunks", "images", "copies", "identities", "site-token")

# A site's name in reports: at the start of a run "query.site_info" asks each node; the reply is
# one ConfigRecord "site" {"site-name": NAME}, NAME being the SuperNode's node-config
# "site-name" (partition-<id> in a simulation); the guard lets exactly that string out.
SITE_INFO_ACTION = "site_info"
SITE_INFO_MESSAGE_TYPE = f"query.{SITE_INFO_ACTION}"
SITE_RECORD = "site"
SITE_NAME_KEY = "site-name"
SITE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
