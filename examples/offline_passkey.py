"""Offline LLM API with SnapKV: passkey retrieval from long prompts on the embedded demo model.

    python examples/offline_passkey.py --budget 256 --filler-tokens 2000
    python examples/offline_passkey.py --budget 0            # full cache, for comparison

vLLM's default engine runs here (engine core and worker in their own processes), so this is also
the check that the plugin loads in every process and its plans reach the worker.
"""

from __future__ import annotations

import argparse
import json

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=256, help="SnapKV budget; 0 = full cache")
    parser.add_argument("--filler-tokens", type=int, default=2000)
    parser.add_argument("--dump-selections-to", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON line per request")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_snapkv.demo_model import build_demo_model
    from vllm_snapkv.tasks import passkey_prompt

    additional_config = {}
    if args.budget:
        additional_config["kv_compression"] = {
            "method": "snapkv",
            "budget": args.budget,
            "dump_selections_to": args.dump_selections_to,
        }
    llm = LLM(
        str(build_demo_model()),
        dtype="float32",  # SmolLM2-135M gives garbage in bf16 on CPU
        max_model_len=8192,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=1 << 30,
        enforce_eager=args.enforce_eager,
        additional_config=additional_config,
    )
    cases = [(68413, 0.1), (90271, 0.5), (17342, 0.9)]
    prompts = [passkey_prompt(args.filler_tokens, key, depth) for key, depth in cases]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    for (key, depth), output in zip(cases, outputs):
        text = output.outputs[0].text
        if args.json:
            record = {"request_id": output.request_id, "passkey": key, "depth": depth}
            record.update(text=text, prompt_len=len(output.prompt_token_ids))
            print(json.dumps(record))
        else:
            verdict = "ok" if str(key) in text else "MISSED"
            print(f"depth {depth:.0%}: passkey {key} -> {text!r} [{verdict}]")


if __name__ == "__main__":
    main()
