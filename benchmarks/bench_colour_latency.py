"""Median latency of Engine.search with and without the colour scores, on an index with colour-names.

    python benchmarks/bench_colour_latency.py INDEX_DIR   # an index with conse-effnet-lite0, effnet-lite0, colour-names

Queries: text naming a colour (colour on / off), an image, image + "in green" (on / off), image + "as a car",
text + a colour filter; median of 15 after one warm-up (text embeddings and filter masks are cached, as
in a running server). The query image is the Tux Paint red flag (``tuxpaint-stamps-default``).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.engine.engine import Engine

e = Engine(sys.argv[1], device="cpu")
img = open("/usr/share/tuxpaint/stamps/town/flags/redflag.png", "rb").read()


def t(fn, n=15):
    fn()
    xs = []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - a) * 1e3)
    return statistics.median(xs)


print("| query | median ms |\n|---|---:|")
for label, kw in (("text, colour off", dict(text="a red apple", colour=False)),
                  ("text naming a colour", dict(text="a red apple")),
                  ("image", dict(image=img)), ("image + 'in green'", dict(image=img, instruction="in green")),
                  ("image + 'in green', colour off", dict(image=img, instruction="in green", colour=False)),
                  ("image + 'as a car'", dict(image=img, instruction="as a car")),
                  ("text + colour filter", dict(text="a fruit", filter={"colour-names": "red"}))):
    print(f"| {label} | {t(lambda kw=kw: e.search(k=20, **kw)):.2f} |")
