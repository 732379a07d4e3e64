"""``LoraScLM``: an lm-eval model over a torchtune decoder and tokenizer (registered as ``"lorasc"``).

The decoder is built from the checkpoint's whole ``config.json`` (Llama-2, Llama-3.x, Mistral,
Qwen2.5, Phi-3; :mod:`evals.model_loading`), and the tokenizer to match its ``model_type``.

Construction, from lm-eval's CLI (``--model lorasc --model_args checkpoint_dir=...,tokenizer_path=...``)
or from Python with ready objects (``LoraScLM(model=m, tokenizer=t)``). Requests go to:

* ``loglikelihood`` -- lm-eval's ``TemplateLM`` splits each (context, continuation) into token ids the
  HF-adapter way (context trailing spaces move to the continuation; the continuation ids are the tail
  of ``encode(context + continuation)``); :func:`evals.scoring.score_requests` scores them exactly,
  running shared inputs once and projecting only continuation positions to the vocabulary.
* ``loglikelihood_rolling`` -- lm-eval's rolling windows over the text, conditioned on BOS, scored in
  one length-sorted pass over all windows of all documents.
* ``generate_until`` -- batched greedy decoding with a KV cache (:mod:`evals.decoding`), stopping at
  EOS, at any ``until`` string, or after ``max_gen_toks``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from evals import MODEL_NAME
from evals.decoding import greedy_generate
from evals.instructeval.paths import TASK_OPTION_KEYS
from evals.model_loading import checkpoint_model_type, load_model, load_tokenizer, resolve_device, resolve_dtype
from evals.scoring import score_requests

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
# Context tokens kept before the generated text when decoding it: SentencePiece drops the leading
# space of the first piece it decodes, so a continuation is decoded after a short anchor of context.
_DECODE_ANCHOR = 16


def _parse_batch_size(batch_size: Any) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        log.warning("batch_size=%s: automatic sizing is not implemented; using %d",
                    batch_size, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return size


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model(MODEL_NAME)
class LoraScLM(TemplateLM):
    """lm-eval model over a torchtune ``TransformerDecoder`` + torchtune tokenizer.

    Args:
        checkpoint_dir: HF checkpoint folder (``config.json`` + ``model-*.safetensors``), e.g. a merged
            ``<output_dir>/epoch_N``. Ignored when ``model`` is given.
        tokenizer_path: ``tokenizer.model`` (SentencePiece for Llama-2, Mistral, Phi-3; tiktoken for
            Llama-3.x) or, for Qwen2.5, ``vocab.json`` (``merges.txt`` beside it) or their folder.
            Ignored when ``tokenizer`` is given.
        model / tokenizer: ready objects (Python API and the ``tune run`` recipe).
        checkpoint_files: weight file names inside ``checkpoint_dir`` (default: discovered).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. dtype: ``fp32``/``bf16``/``fp16``/``auto``.
        batch_size: rows per forward pass (``auto`` falls back to 8).
        max_seq_len: context window to use (default: the model's ``max_seq_len``).
        max_gen_toks: default generation budget when a task does not set ``max_gen_toks``.
        use_cache: decode with a KV cache (default True); False recomputes the sequence every step.
        add_bos: prepend BOS to contexts (Llama-2 was trained with it; default True).
        **task_options: data settings for the tasks (``data_dir``, ``drop_path``, ...); ignored here.
    """

    def __init__(
        self,
        checkpoint_dir: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        checkpoint_files: Optional[Sequence[str] | str] = None,
        device: Optional[str] = None,
        dtype: Optional[str | torch.dtype] = None,
        batch_size: Any = None,
        max_batch_size: Optional[int] = None,  # accepted for lm-eval's CLI; sizing is fixed
        max_seq_len: Optional[int] = None,
        max_gen_toks: int = 256,
        use_cache: Any = True,
        add_bos: Any = True,
        **task_options: Any,
    ) -> None:
        super().__init__()
        # lm-eval also hands --model_args to the tasks (as metadata), so data keys such as
        # drop_path may arrive here: accept those, reject anything else as a likely typo.
        unknown = sorted(set(task_options) - set(TASK_OPTION_KEYS))
        if unknown:
            raise TypeError(f"{MODEL_NAME}: unknown model_args {unknown}; model keys are checkpoint_dir, "
                            "tokenizer_path, checkpoint_files, device, dtype, batch_size, max_seq_len, "
                            f"max_gen_toks, use_cache, add_bos; task keys are {sorted(TASK_OPTION_KEYS)}")
        if model is None:
            if checkpoint_dir is None:
                raise ValueError(f"{MODEL_NAME}: pass checkpoint_dir=<HF checkpoint folder> (or model=)")
            self._device = resolve_device(device)
            self._dtype = resolve_dtype(dtype, self._device)
            files = [checkpoint_files] if isinstance(checkpoint_files, str) else checkpoint_files
            model = load_model(checkpoint_dir, checkpoint_files=files, max_seq_len=max_seq_len,
                               device=self._device, dtype=self._dtype)
        else:
            param = next(model.parameters())
            self._device, self._dtype = param.device, param.dtype
        if tokenizer is None:
            if tokenizer_path is None:
                raise ValueError(f"{MODEL_NAME}: pass tokenizer_path=<tokenizer.model> (or tokenizer=)")
            model_type = checkpoint_model_type(checkpoint_dir) if checkpoint_dir else None
            tokenizer = load_tokenizer(tokenizer_path, model_type=model_type)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint_dir = str(checkpoint_dir) if checkpoint_dir else None
        self._max_length = int(max_seq_len) if max_seq_len else int(model.max_seq_len)
        if self._max_length > model.max_seq_len:
            raise ValueError(f"max_seq_len={self._max_length} exceeds the model's {model.max_seq_len}")
        self._batch_size = _parse_batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.use_cache = _as_bool(use_cache)
        self.add_bos = _as_bool(add_bos)
        pad = getattr(tokenizer, "pad_id", None)
        # SentencePiece Llama-2 has no pad id (-1 / None); any id works because pads are never
        # attended to or scored, so use 0 (unk).
        self._pad_id = pad if isinstance(pad, int) and pad >= 0 else 0
        stop = set(getattr(tokenizer, "stop_tokens", None) or [])
        self._stop_ids = sorted(stop | {tokenizer.eos_id})

    # ---- properties lm-eval reads -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Empty contexts and rolling windows condition on BOS, as Llama saw at training; a tokenizer
        # without one (Qwen2.5) conditions on EOS, as lm-eval's HF model does.
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"lorasc-{type(self.tokenizer).__name__}"

    def get_model_info(self) -> Dict[str, Any]:
        """Extra fields for lm-eval's results ``config`` block."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self._dtype),
            "checkpoint_dir": self.checkpoint_dir,
            "max_length": self._max_length,
        }

    # ---- tokenization -----------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """Token ids of ``string``; BOS first unless ``add_special_tokens`` is False (or add_bos off)."""
        add_bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        return list(self.tokenizer.encode(string, add_bos=add_bos, add_eos=False))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def decode_continuation(self, context: Sequence[int], generated: Sequence[int]) -> str:
        """Text of ``generated`` as it reads after ``context``.

        Decoding generated ids alone loses their leading space (``"▁▁▁"`` + ``"▁return"`` decodes to
        three spaces, not four), which breaks indentation in code; decoding behind a few context
        tokens and cutting that prefix off keeps it.
        """
        anchor = list(context[-_DECODE_ANCHOR:])
        head = self.tok_decode(anchor)
        full = self.tok_decode(anchor + list(generated))
        return full[len(head):] if full.startswith(head) else self.tok_decode(generated)

    # ---- log-likelihood ---------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: List[Tuple[Tuple[str, str], List[int], List[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> List[Tuple[float, bool]]:
        """Score ``(cache_key, context_ids, continuation_ids)`` requests; see :mod:`evals.scoring`."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = score_requests(self.model, pairs, max_length=self.max_length,
                                 batch_size=self.batch_size, pad_id=self._pad_id)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of each whole text, in disjoint windows of at most ``max_length`` tokens."""
        windows: List[Tuple[None, List[int], List[int]]] = []
        owner: List[int] = []
        for idx, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(idx)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owner, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        """Greedy continuations; requests sharing generation kwargs are batched, longest first."""
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            until, budget = self._generation_settings(gen_kwargs)
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - budget):] for i in members}
            members.sort(key=lambda i: -len(contexts[i]))
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                texts = self._generate_batch([contexts[i] for i in rows], until, budget)
                for i, text in zip(rows, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_settings(self, gen_kwargs: Dict[str, Any]) -> Tuple[List[str], int]:
        """``(stop strings, max new tokens)`` from a task's generation kwargs (greedy only)."""
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        budget = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if budget < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {budget}")
        if budget > self.max_length // 2:
            # A short-context model (the demo's 256 tokens) cannot honour HumanEval's 512: keep at
            # least half of the window for the prompt instead of failing the whole run.
            log.warning("max_gen_toks=%d does not fit max_length=%d; generating at most %d tokens",
                        budget, self.max_length, self.max_length // 2)
            budget = self.max_length // 2
        if _as_bool(gen_kwargs.pop("do_sample", False)) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0:
            log.warning("%s decodes greedily; sampling settings are ignored", MODEL_NAME)
        return [u for u in until if u], budget

    def _generate_batch(self, contexts: List[List[int]], until: List[str], budget: int) -> List[str]:
        def hit_stop_string(row: int, generated: List[int]) -> bool:
            text = self.decode_continuation(contexts[row], generated)
            return any(u in text for u in until)

        generated = greedy_generate(
            self.model, contexts, max_new_tokens=budget, pad_id=self._pad_id,
            stop_ids=self._stop_ids, stop_fn=hit_stop_string if until else None, use_cache=self.use_cache,
        )
        texts = []
        for ctx, gen in zip(contexts, generated):
            text = self.decode_continuation(ctx, gen)
            cut = min((text.find(u) for u in until if u in text), default=len(text))
            texts.append(text[:cut])
        return texts

