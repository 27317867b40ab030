"""The demo's last step: recognise a few held-out LFW people through the recognition service.

It does what a deployment does, on loopback: `minusfed serve` starts on the run's server half
(TLS with a fresh CA, one API token), and a site client holding only the site half enrolls one
photo of each person and then sends a *different* photo of each, protected with fresh
permutations, to `verify` (against the person's own subject and against another person's) and
to `identify`.  Only X_p crosses the connection; the service is stopped by its PID.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clients.data import read_pairs

SERVICE_FAR = "1e-2"       # LFW's held-out fold has too few negatives to calibrate 1e-3 well


@dataclass
class Outcome:
    person: str
    genuine: float          # score of another photo of the person against their subject
    genuine_match: bool
    impostor: float         # score of that photo against the next person's subject
    impostor_match: bool
    top1: str               # identify's first candidate


def held_out_people(data: Path, fold: int, count: int) -> list[tuple[str, Path, Path]]:
    """(person, photo to enroll, another photo to recognise) for the first `count` people of
    the fold's genuine pairs: people no site trained on."""
    chosen: dict[str, tuple[str, Path, Path]] = {}
    for pair in read_pairs(data / "pairs.txt"):
        if pair.fold == fold and pair.same:
            person = Path(pair.path_a).parent.name
            chosen.setdefault(person, (person, Path(pair.path_a), Path(pair.path_b)))
            if len(chosen) == count:
                break
    return list(chosen.values())


def recognise(bundle: Path, data: Path, fold: int, count: int = 6,
              far: str = SERVICE_FAR) -> tuple[list[Outcome], float]:
    """Enroll, verify and identify `count` held-out people through a real service on loopback;
    the outcomes and the service's threshold at `far`."""
    from clients.recognition_client import RecognitionClient
    from federation.service.process import Service
    from task.bundle import read_server

    threshold = read_server(bundle / "server").threshold(far)
    people = held_out_people(data, fold, count)
    with tempfile.TemporaryDirectory(prefix="minusfed-demo-service-") as tmp:
        service = Service(Path(tmp), bundle / "server", Path(tmp) / "gallery.db",
                          extra=["--far", far]).wait()
        try:
            with RecognitionClient(service.url, bundle / "site", service.token,
                                   ca_cert=service.ca) as client:
                for person, enroll, _ in people:
                    client.enroll(person, data / enroll)
                out = []
                for i, (person, _, probe) in enumerate(people):
                    other = people[(i + 1) % len(people)][0]
                    mine, theirs = client.verify(person, data / probe), client.verify(other, data / probe)
                    top = client.identify(data / probe, k=1)
                    out.append(Outcome(person, mine.score, mine.match, theirs.score, theirs.match,
                                       top[0].subject if top else "-"))
        finally:
            service.stop()
    return out, threshold


def table(outcomes: list[Outcome], threshold: float, far: str) -> str:
    """The outcomes as the demo prints them, with the totals a reader checks first."""
    lines = [f"{'person':<26} {'own subject':>12} {'other subject':>14}  identify top-1",
             *(f"{o.person:<26} {o.genuine:>7.3f} {'match' if o.genuine_match else 'no':>4} "
               f"{o.impostor:>8.3f} {'MATCH' if o.impostor_match else 'no':>5}  "
               f"{o.top1}{'' if o.top1 == o.person else '  (wrong)'}" for o in outcomes)]
    n = len(outcomes)
    rule = (f"cosine >= {threshold:.3f}" if math.isfinite(threshold) else
            "no threshold: the held-out pairs had too few negatives to calibrate one, so nothing "
            "is accepted")
    lines.append(f"verify at FAR {far} ({rule}): {sum(o.genuine_match for o in outcomes)}"
                 f"/{n} genuine accepted, {sum(o.impostor_match for o in outcomes)}/{n} impostors "
                 f"accepted; identify top-1 correct {sum(o.top1 == o.person for o in outcomes)}/{n} "
                 f"(chance {1 / n:.2f})")
    return "\n".join(lines)
