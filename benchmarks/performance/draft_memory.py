"""KV cache memory of draft-model speculative decoding under SnapKV: drafter compressed with the
target (what the plugin does) against a drafter kept whole.

    python -m benchmarks.performance.draft_memory [--smoke]

One engine: the demo model drafting for itself (``method: draft_model``), SnapKV at
``--budget`` with ``--decode-interval``. vLLM puts the drafter's layers in the target's KV cache
group, so each block holds both models' layers. The same batch runs compressed and with the full
cache (the requests opt out); each request's blocks are read from the scheduler after every
step (the peak while decoding). Bytes = blocks x the layers' page size, per model. "drafter
whole" is what a drafter kept uncompressed in a group of its own would hold: the target's layers
in the compressed run's blocks, the drafter's in the full run's (derived from the two measured
block counts; vLLM builds no such group for a drafter with the target's KV spec).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import demo_llm, machine, markdown_table, progress, scheduler_of, write_csv
from benchmarks.performance.speculative import copy_prompt, spec_counters


def run_batch(llm, prompts: list[str], compressed: bool, max_tokens: int) -> dict:
    """Peak blocks per request while decoding, tokens, steps and acceptance of one batch."""
    from vllm import SamplingParams

    scheduler = scheduler_of(llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    engine = llm.llm_engine
    extra = None if compressed else {"kv_compression": "none"}
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
    )
    llm.reset_prefix_cache()
    accepted, drafted = spec_counters(llm)
    tokenizer = llm.get_tokenizer()
    names = [f"{'snapkv' if compressed else 'full'}-{i}" for i in range(len(prompts))]
    for name, prompt in zip(names, prompts):
        engine.add_request(name, {"prompt_token_ids": tokenizer(prompt).input_ids}, params)
    ids = {
        name: next(r for r in scheduler.requests if r.startswith(name)) for name in names
    }
    peak, steps, tokens = dict.fromkeys(names, 0), 0, {}
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = list(output.outputs[0].token_ids)
        steps += 1
        for name, request_id in ids.items():
            request = scheduler.requests.get(request_id)
            if request is not None and request.num_output_tokens:
                peak[name] = max(peak[name], len(manager.req_to_blocks[request_id]))
    seconds = time.perf_counter() - started
    new_accepted, new_drafted = spec_counters(llm)
    return {
        "peak_blocks": max(peak.values()),
        "steps": steps,
        "seconds": seconds,
        "acceptance_rate": (new_accepted - accepted) / max(new_drafted - drafted, 1),
        "tokens": [tokens[name] for name in sorted(tokens)],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode-interval", type=int, default=128)
    parser.add_argument("--num-drafts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/draft-memory"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt_tokens, args.max_tokens, args.batch = 400, 24, 1

    from vllm_snapkv.demo_model import build_demo_model

    progress("engine: the demo model drafting for itself")
    llm = demo_llm(
        args.budget,
        enforce_eager=True,
        max_model_len=4096,
        max_num_batched_tokens=512,
        disable_log_stats=False,
        speculative_config={
            "method": "draft_model", "model": str(build_demo_model()),
            "num_speculative_tokens": args.num_drafts,
        },
        additional_config={"kv_compression": {
            "method": "snapkv", "budget": args.budget, "window_size": 32, "kernel_size": 7,
            "decode_interval": args.decode_interval,
        }},
    )
    (group,) = scheduler_of(llm).kv_cache_config.kv_cache_groups
    layer_bytes = group.kv_cache_spec.page_size_bytes  # one layer's share of one block
    drafter_layers = sum(name.startswith("draft_model.") for name in group.layer_names)
    target_layers = len(group.layer_names) - drafter_layers
    prompts = [copy_prompt(i, args.prompt_tokens) for i in range(args.batch)]
    results = {}
    for compressed in (True, False):
        results[compressed] = run_batch(llm, prompts, compressed, args.max_tokens)
        progress(f"compressed={compressed}: {results[compressed]['peak_blocks']} blocks")
    llm.llm_engine.engine_core.shutdown()

    mib = 2**20
    snap, full = results[True]["peak_blocks"], results[False]["peak_blocks"]
    layouts = [
        ("full cache (request opts out)", full, full),
        ("SnapKV, drafter compressed with the target (the plugin)", snap, snap),
        ("SnapKV, drafter kept whole (derived)", snap, full),
    ]
    rows = [
        {
            "kv_cache": label,
            "target_blocks": target_blocks,
            "drafter_blocks": drafter_blocks,
            "target_MiB": target_blocks * target_layers * layer_bytes / mib,
            "drafter_MiB": drafter_blocks * drafter_layers * layer_bytes / mib,
            "MiB_per_request": (target_blocks * target_layers + drafter_blocks * drafter_layers)
            * layer_bytes / mib,
        }
        for label, target_blocks, drafter_blocks in layouts
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "draft_memory.csv", rows)
    text = (
        f"Machine: {machine()}. SmolLM2-135M fp32 drafting for itself ({args.num_drafts} drafts "
        f"a step), eager, batch of {args.batch} prompts of ~{args.prompt_tokens} tokens, "
        f"{args.max_tokens} output tokens each (greedy, ignore_eos); SnapKV budget "
        f"{args.budget}, window 32, decode_interval {args.decode_interval}; block "
        f"{group.kv_cache_spec.block_size} tokens, {target_layers} target + {drafter_layers} "
        f"drafter layers of {layer_bytes / mib:.3g} MiB per block each. Peak blocks of one "
        "request while decoding. Acceptance "
        f"{results[True]['acceptance_rate']:.3f} (compressed) / "
        f"{results[False]['acceptance_rate']:.3f} (full); steps {results[True]['steps']} / "
        f"{results[False]['steps']}.\n\n" + markdown_table(rows)
    )
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
