"""CTranslate2's side of bench/cpu_decode.py, in a process of its own that never imports torch.

In one process with torch, CTranslate2's OpenMP calls bind to torch's libgomp (torch loads it first, globally), so
its worker thread adds a second OpenMP team to torch's runtime: on a 2-core machine libgomp then counts more
threads than cores and throttles every team's spin-wait, and torch's fork/join sleeps on a futex instead. Measured
here: kogpt-fast's batch-8 decode went from 27 to 38-41 ms/token, for good, once CTranslate2 had run once (the CPUs
idle 30% of the time). Alone in its process, CTranslate2 uses its own bundled libgomp and nobody else's threads.

Protocol: one JSON object a line on stdin, {"prompts": [[token, ...], ...], "n": new_tokens}; one JSON line back,
{"tokens": [[id, ...], ...]} (the new tokens of each prompt), or {"error": "..."}. The first line out is
{"ready": version} once the model is loaded.
"""
from __future__ import annotations

import json
import sys


def main(model_dir: str, threads: int) -> int:
    import ctranslate2

    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="float32", intra_threads=threads)
    print(json.dumps({"ready": ctranslate2.__version__}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            prompts = [[f"t{i}" for i in row] for row in request["prompts"]]
            n = int(request["n"])
            results = generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1,
                                               include_prompt_in_result=False, end_token=[])
            reply = {"tokens": [[int(t[1:]) for t in r.sequences[0]] for r in results]}
        except Exception as e:  # noqa: BLE001 - the parent reports it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
