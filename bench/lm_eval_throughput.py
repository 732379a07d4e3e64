"""lm-eval loglikelihood throughput: our ``lorasc`` model against lm-eval's stock ``hf`` model.

    python bench/lm_eval_throughput.py --repeats 3 --out /tmp/lm_eval_throughput.json
    python bench/lm_eval_throughput.py --smoke            # seconds: tiny model, 24 requests, 1 repeat

Both models load the *same* Hugging Face checkpoint folder (a Llama-2-shaped model with random weights,
written locally: no download) and answer the *same* lm-eval ``loglikelihood`` requests, built by lm-eval
from the MeZO-protocol multiple-choice tasks on the shared data (``mezo_cb``, ``mezo_copa``,
``mezo_rte``; 650 requests by default). Each repeat sends all requests to each model in
``loglikelihood`` calls of about 50 requests (whole documents, so a document's choices stay
together), end to end (tokenization included), the two models alternating call by call so that the
load of a shared machine hits both alike; a repeat's time is the sum over its calls. Reported: the
per-model medians over repeats of wall time, the throughput ratio ``median hf / median lorasc``
(above 1: ``lorasc`` is faster), the process CPU times beside them, and the load average at the end.
Both tokenizers read the same SentencePiece ``tokenizer.model``; the script checks that they give
the same token ids for every request and that the two models' scores agree.

The model is the one bench/overhead.py trains: vocab 32000, dim 512, 4 layers, 8 heads, MLP 1376
(about 45M parameters), fp32, batch size 8 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lorasc_tune._paths import shared_data_dir  # noqa: E402

MODEL_45M = dict(vocab_size=32000, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=512,
                 intermediate_dim=1376, max_seq_len=1024, norm_eps=1e-5)
MODEL_SMOKE = dict(MODEL_45M, num_layers=1, embed_dim=64, num_heads=4, num_kv_heads=4, intermediate_dim=128)
# (task, documents): 56 x 3 + 100 x 2 + 141 x 2 = 650 requests.
TASKS = (("mezo_cb", 56), ("mezo_copa", 100), ("mezo_rte", 141))
SMOKE_TASKS = (("mezo_cb", 4), ("mezo_copa", 6))


def build_requests(tasks, data_dir: Path) -> List[Any]:
    """lm-eval ``Instance`` objects of the given tasks' first documents, in lm-eval's order."""
    from evals.suite import task_manager

    manager = task_manager()
    loaded = manager.load([name for name, _ in tasks])["tasks"]
    requests = []
    for name, limit in tasks:
        task = loaded[name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return requests


def load_models(ckpt: Path, tokenizer_model: Path, batch_size: int, workdir: Path):
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from evals.lm_adapter import LoraScLM

    ours = LoraScLM(checkpoint_dir=str(ckpt), tokenizer_path=str(tokenizer_model), device="cpu",
                    dtype="fp32", batch_size=batch_size)
    # transformers reads a SentencePiece tokenizer.model from a folder; give it one of its own.
    tok_dir = workdir / "hf_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    shutil.copy(tokenizer_model, tok_dir / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), add_bos_token=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    stock = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=batch_size, device="cpu",
                 add_bos_token=True, max_length=ours.max_length)
    return ours, stock


def doc_chunks(requests, size: int) -> List[List[Any]]:
    """Consecutive runs of about ``size`` requests that never split one document's requests (its
    choices), so input sharing within a document is the same whichever way the requests are cut."""
    chunks: List[List[Any]] = [[]]
    for i, req in enumerate(requests):
        new_doc = i == 0 or (req.task_name, req.doc_id) != (requests[i - 1].task_name, requests[i - 1].doc_id)
        if new_doc and len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].append(req)
    return [c for c in chunks if c]


def same_token_ids(ours, stock, requests) -> int:
    """Number of requests whose (context, continuation) token ids differ between the two models."""
    return sum(ours._encode_pair(*r.args) != stock._encode_pair(*r.args) for r in requests)


def run(args) -> Dict[str, Any]:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    tokenizer_model = shared_data_dir() / "llama2_tokenizer" / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise FileNotFoundError(f"benchmark input missing: {tokenizer_model} (set LORASC_SHARED_DATA)")
    from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint

    tasks = SMOKE_TASKS if args.smoke else TASKS
    model_args = MODEL_SMOKE if args.smoke else MODEL_45M
    with tempfile.TemporaryDirectory(prefix="lm_eval_tput_") as tmp:
        workdir = Path(tmp)
        ckpt = write_tiny_llama2_hf_checkpoint(workdir / "ckpt", model_args=model_args)
        requests = build_requests(tasks, shared_data_dir())
        if args.requests:
            requests = requests[: args.requests]
        ours, stock = load_models(ckpt, tokenizer_model, args.batch_size, workdir)
        mismatched = same_token_ids(ours, stock, requests)
        times: Dict[str, List[float]] = {"lorasc": [], "hf": []}
        cpu_times: Dict[str, List[float]] = {"lorasc": [], "hf": []}
        scores: Dict[str, List[Any]] = {}
        ours.loglikelihood(requests[: args.batch_size], disable_tqdm=True)  # warm-up (allocator, threads)
        stock.loglikelihood(requests[: args.batch_size], disable_tqdm=True)
        chunks = doc_chunks(requests, args.chunk)
        for rep in range(args.repeats):
            for name in times:
                times[name].append(0.0)
                cpu_times[name].append(0.0)
                scores[name] = []
            for j, chunk in enumerate(chunks):
                pair = (("lorasc", ours), ("hf", stock))
                for name, lm in (pair if (rep + j) % 2 == 0 else pair[::-1]):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    scores[name] += lm.loglikelihood(chunk, disable_tqdm=True)
                    times[name][-1] += time.perf_counter() - start
                    cpu_times[name][-1] += time.process_time() - cpu_start
    diff = max(abs(a[0] - b[0]) for a, b in zip(scores["lorasc"], scores["hf"]))
    greedy_agree = sum(a[1] == b[1] for a, b in zip(scores["lorasc"], scores["hf"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    paired = [h / o for h, o in zip(times["hf"], times["lorasc"])]
    return {
        "what": "lm-eval loglikelihood: lorasc vs stock hf, same checkpoint, same requests",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), "
                   f"torch threads {args.threads}, {platform.system()} {platform.release()}",
        "model": model_args, "dtype": "fp32", "batch_size": args.batch_size,
        "tasks": [list(t) for t in tasks], "requests": len(requests), "calls_per_repeat": len(chunks),
        "token_id_mismatches": mismatched,
        "max_abs_logprob_diff": diff, "greedy_flags_equal": f"{greedy_agree}/{len(requests)}",
        "load_average_1_5_15": list(os.getloadavg()),
        "seconds": times, "median_seconds": med,
        "cpu_seconds": cpu_times, "median_cpu_seconds": cpu_med,
        "requests_per_second": {k: len(requests) / v for k, v in med.items()},
        "throughput_ratio_lorasc_over_hf": med["hf"] / med["lorasc"],
        "cpu_time_ratio_hf_over_lorasc": cpu_med["hf"] / cpu_med["lorasc"],
        "per_repeat_ratios": paired,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--requests", type=int, default=0, help="use only the first N requests")
    parser.add_argument("--chunk", type=int, default=50,
                        help="requests per call; the models alternate call by call (whole documents)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and few requests (seconds)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
