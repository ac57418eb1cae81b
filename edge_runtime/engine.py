"""The engine: a loaded bundle, its decoder and KV cache, and generation as a stack of generators.

    generate_step(prompt_ids) -> token ids       (reuses the cached prefix, then one forward per token)
    stream_generate(prompt)   -> text pieces     (StreamingDetokenizer)
    generate(prompt)          -> the full text
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .cached import CachedDecoder
from .chat_template import CHATML, ChatTemplate
from .decoder import Decoder
from .detokenizer import StreamingDetokenizer
from .errors import BundleError, ExecutionProviderError, InvalidArgumentError
from .hugepages import huge_pages_for_what_loads
from .manifest import GraphSpec
from .memory import check_memory, draft_graph
from .drafters import EagleDrafter, HybridDrafter, ModelDrafter, NgramDrafter, split_draft
from .eagle import EagleModel
from .sampling import SamplingParams, make_logits_processor, make_sampler
from .speculative import DraftLength, speculative_steps
from .providers import check_ep
from .session import create_session
from .static_decoder import load_static_decoder
from .tokenizer import load_tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0      # tokens in the prompt
    prefilled_tokens: int = 0   # of those, the ones actually run (the rest came from the cache)
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # from the first generated token to the last
    finish_reason: str = ""      # "stop" (an end-of-sequence token), "length" (max_tokens)
    target_calls: int = 0        # target forward calls after prefill
    drafted_tokens: int = 0      # speculative decoding: tokens proposed by the draft
    accepted_tokens: int = 0     # ... and accepted by the target
    rounds_with_drafts: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per round that drafted."""
        return self.accepted_tokens / self.rounds_with_drafts if self.rounds_with_drafts else 0.0

    @property
    def calls_per_token(self) -> float:
        return self.target_calls / max(1, self.generated_tokens - 1)

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; the decode rate counts the steps after it
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def make_decoder(bundle: Bundle, spec: GraphSpec, context: int, threads: int | None = None, ep: str | None = None,
                 ep_options: dict[str, str] | None = None) -> Decoder:
    """The decoder for one graph of a bundle, by the graph's kind. ep: "cpu" or "qnn" [the graph's own]."""
    arch = bundle.manifest.architecture
    ep = check_ep(ep or spec.execution_provider)
    if spec.kind == "static":  # an NPU's fixed-shape variants (static_decoder.py)
        return load_static_decoder(bundle, spec.role, context, threads, ep, ep_options)
    if ep != "cpu":
        raise ExecutionProviderError(f"graph {spec.file} has dynamic shapes (kind {spec.kind!r}) and runs on the CPU "
                                     f"only; for --ep {ep} export with `edge-rt export ... --target-ep {ep}`")
    if spec.kind == "gqa":
        session = create_session(bundle.file(spec.file), threads)
        return Decoder(session, arch, spec.num_layers or arch.num_layers, context, kv_dtype=np.dtype(spec.kv_dtype))
    raise BundleError(f"graph {spec.file} has kind {spec.kind!r}, which this runtime cannot run; upgrade edge-runtime")


def draft_ep_for(draft: str, spec: GraphSpec, asked: str | None, target_ep: str) -> str:
    """Where a model draft runs: `asked` (--draft-ep), else the target's EP for --draft target (the same graph),
    else the draft graph's own EP. Dynamic-shape graphs run on the CPU only."""
    ep = check_ep(asked or (target_ep if draft == "target" else spec.execution_provider))
    if ep != "cpu" and spec.kind != "static":
        raise ExecutionProviderError(f"draft {draft} is a dynamic-shape graph (kind {spec.kind!r}) that runs on the CPU "
                                     f"only; pass --draft-ep cpu, or a draft exported with --target-ep {ep}")
    return ep


def check_draft_compatible(engine: Engine, draft: Bundle) -> None:
    """A separate draft must speak the target's vocabulary: same ids for the same strings, same stops."""
    from .tokenizer import load_tokenizer as load
    dm, tm = draft.manifest, engine.manifest
    draft_vocab = load(draft.file(dm.tokenizer)).get_vocab()
    same_rows = dm.vocab_map is not None or dm.architecture.vocab_size == tm.architecture.vocab_size
    if draft_vocab != engine.tokenizer.get_vocab() or not same_rows:
        raise BundleError(f"draft {draft.path} does not share the target's vocabulary ({len(draft_vocab)} vs "
                          f"{engine.tokenizer.get_vocab_size()} tokens or different ids); pick a draft from the "
                          "same model family")
    if set(dm.tokens.eos) != set(tm.tokens.eos):
        raise BundleError(f"draft {draft.path} has end-of-sequence tokens {list(dm.tokens.eos)}, the target "
                          f"{list(tm.tokens.eos)}; pick a draft from the same model family")


def load_vocab_map(draft: Bundle, target_vocab: int) -> np.ndarray | None:
    """A reduced-vocabulary draft's row -> target id map, checked; None for a draft with the target's rows."""
    m = draft.manifest
    if m.vocab_map is None:
        return None
    if m.vocab_map not in m.files:
        raise BundleError(f"draft {draft.path} names {m.vocab_map} but lists no sha256 for it; rebuild the draft")
    try:
        vmap = np.load(draft.file(m.vocab_map), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{draft.file(m.vocab_map)} is not a readable .npy file ({e}); rebuild the draft") from None
    rows = m.architecture.vocab_size  # the draft's logit rows
    ok = (vmap.ndim == 1 and vmap.dtype.kind in "iu" and len(vmap) == rows and 0 <= vmap.min()
          and vmap.max() < target_vocab and np.unique(vmap).size == rows)
    if not ok:
        raise BundleError(f"{draft.file(m.vocab_map)} is not a map of {rows} distinct target ids below {target_vocab}; "
                          "rebuild the draft for this target")
    return vmap.astype(np.int64)


class Engine:
    """A target model, optionally a draft, and generation.

    draft: None/"none" (target only), "ngram" (prompt lookup), "self" (the bundle's own draft graph), "ngram+X"
    (prompt lookup where the history repeats, the model draft X elsewhere),
    "target" (the target as its own draft: a test of the machinery), or a draft bundle folder / card name.
    """

    def __init__(self, bundle: Bundle, context: int | None = None, threads: int | None = None,
                 draft: str | None = None, draft_min: int = 1, draft_max: int = 4, adaptive: bool = True,
                 memory_budget: int | None = None, ep: str | None = None, ep_options: dict[str, str] | None = None,
                 draft_ep: str | None = None, huge_pages: bool = True):
        """ep: where the target runs, "cpu" or "qnn" [the graph's own]; ep_options: provider options (QNN, for
        the target and a draft on QNN); draft_ep: where a model draft runs [see draft_ep_for; ignored by the
        model-free drafts none and ngram]. A QNN target with a CPU draft is a heterogeneous pair. huge_pages:
        move the loaded weights onto 2 MiB pages (Linux; hugepages.py): decode steps 4-5% faster. It runs in the
        background (~3 ms per MB on these VMs) and the first generation waits for what is left of it."""
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        spec = m.graph("target")
        context = m.defaults.context if context is None else context  # 0 is an error, not "default"
        if not 0 < context <= m.architecture.max_position_embeddings:
            raise InvalidArgumentError(
                f"context {context} is out of range; this model takes 1..{m.architecture.max_position_embeddings}")
        self.ep = check_ep(ep or spec.execution_provider)
        self.memory_plan = check_memory(bundle, context, memory_budget, draft, draft_max, self.ep,  # before any
                                        draft_ep)                                               # allocation
        if (found := draft_graph(bundle, draft)) is not None:  # an impossible --draft-ep fails before loading
            draft_ep_for(split_draft(draft)[0], found[1], draft_ep, self.ep)
        if m.vocab_map is not None:
            raise BundleError(f"{bundle.path} is a draft with a reduced vocabulary; use it as --draft of "
                              f"{m.source.get('draft_of') or 'its target model'}")
        self.tokenizer = load_tokenizer(bundle.file(m.tokenizer))
        if self.tokenizer.get_vocab_size() > m.architecture.vocab_size:
            raise BundleError(f"tokenizer has {self.tokenizer.get_vocab_size()} tokens but the model only "
                              f"{m.architecture.vocab_size}; re-export the bundle")
        self.template = ChatTemplate(m.chat_template or CHATML, bos_token=self._token_text(m.tokens.bos),
                                     eos_token=self._token_text(m.tokens.eos[0] if m.tokens.eos else None))
        self.eos = frozenset(m.tokens.eos)
        self._huge_pages, self._collapsing, self._in_load = huge_pages, [], False
        with self._loading():  # target and draft in one collapse: a second would re-walk the first's pages
            self.decoder = make_decoder(bundle, spec, context, threads, self.ep, ep_options)
            self.target = CachedDecoder(self.decoder)
            self._threads, self._ep_options = threads, ep_options
            self.draft_ep = None if draft_ep is None else check_ep(draft_ep)
            self.set_draft(draft, draft_min, draft_max, adaptive)
        self.last_stats = GenerationStats()

    def set_draft(self, draft: str | None, draft_min: int = 1, draft_max: int = 4, adaptive: bool = True,
                  draft_ep: str | None = None) -> None:
        """Switch the draft source (the target and its cache stay loaded). draft_ep: None keeps the engine's."""
        self.draft_length = DraftLength(draft_min, draft_max, adaptive)  # validates the range even with no draft
        if draft_ep is not None:
            self.draft_ep = check_ep(draft_ep)
        self.drafter = None  # the old draft's sessions and cache go before the new one loads (peak memory)
        with self._loading():
            self.drafter = self._make_drafter(draft, self.context, self._threads, draft_max, self.draft_ep)

    @contextlib.contextmanager
    def _loading(self):
        """Around loading graphs: their weights go to huge pages in the background; the next generation waits.
        Inside another _loading (set_draft during __init__) it adds nothing: the outer one collapses all of it."""
        if not self._huge_pages or self._in_load:
            yield
            return
        self._in_load = True
        try:
            with huge_pages_for_what_loads(background=True) as hp:
                yield
        finally:
            self._in_load = False
        self._collapsing.append(hp)

    def _settle(self) -> None:
        while self._collapsing:  # set_draft may have started another meanwhile
            self._collapsing.pop().wait()

    def _make_drafter(self, draft: str | None, context: int, threads: int | None, draft_max: int,
                      draft_ep: str | None = None):
        model, lookup = split_draft(draft)
        if model is None:
            return NgramDrafter() if lookup else None
        drafter = self._model_drafter(model, context, threads, draft_max, draft_ep)
        return HybridDrafter(drafter) if lookup else drafter

    def _model_drafter(self, draft: str, context: int, threads: int | None, draft_max: int,
                       draft_ep: str | None = None):
        m = self.manifest
        # the draft runs up to draft_max tokens past the target's write pointer
        capacity = min(context + draft_max + 1, m.architecture.max_position_embeddings)
        if draft in ("self", "target"):
            bundle, spec = self.bundle, m.graph("draft" if draft == "self" else "target")
            if spec is None:
                raise BundleError(f"bundle {self.bundle.path} has no self-draft graph; export it with "
                                  "`edge-rt export ... --draft self` or pick another --draft")
        else:
            from .cards import resolve_bundle
            bundle = Bundle.load(resolve_bundle(draft))
            check_draft_compatible(self, bundle)
            spec = bundle.manifest.graph("target")
        vocab_map = load_vocab_map(bundle, m.architecture.vocab_size) if bundle is not self.bundle else None
        if spec.kind == "eagle":  # a one-layer draft on the target's features (eagle.py), on the CPU
            model = EagleModel(create_session(bundle.file(spec.file), threads), bundle.manifest.architecture, capacity,
                               getattr(self.decoder, "features", None), target_name=f"target bundle {self.bundle.path}")
            return EagleDrafter(model, draft, draft_max, m.architecture.vocab_size, vocab_map=vocab_map)
        ep = draft_ep_for(draft, spec, draft_ep, self.ep)
        decoder = make_decoder(bundle, spec, self._draft_capacity(bundle, capacity, context), threads, ep,
                               self._ep_options if ep != "cpu" else None)
        return ModelDrafter(CachedDecoder(decoder), draft, draft_max, m.architecture.vocab_size, vocab_map=vocab_map)

    @staticmethod
    def _draft_capacity(bundle: Bundle, capacity: int, context: int) -> int:
        """The draft's cache: `capacity` (context + draft_max + 1) cut to the positions the draft holds (a static
        graph's C). speculative_steps drafts at most target.kv.free - 1 tokens, so the draft never writes past slot
        context - 1: `context` slots suffice."""
        limit = bundle.manifest.architecture.max_position_embeddings
        if limit < context:
            raise InvalidArgumentError(f"draft {bundle.path} holds {limit} positions, fewer than the context {context}; "
                                       f"pass --context {limit} or a draft exported for a longer context")
        return min(capacity, limit)

    @classmethod
    def load(cls, model: str | Path, context: int | None = None, threads: int | None = None, **options) -> Engine:
        """A bundle folder, or the name of a model card whose bundle is already built."""
        from .cards import resolve_bundle
        return cls(Bundle.load(resolve_bundle(model)), context=context, threads=threads, **options)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    # ---- text <-> ids -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # Special tokens come from the chat template as text, so the tokenizer must not add its own.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.template.render(messages, add_generation_prompt=True))

    @property
    def context(self) -> int:
        return self.decoder.kv.capacity

    @property
    def cached_tokens(self) -> int:
        return self.decoder.kv.pos

    def reset(self) -> None:
        self.target.truncate(0)

    def _plain_steps(self, first_logits: np.ndarray, sample, stats: GenerationStats) -> Iterator[int]:
        token = sample(first_logits[-1])
        while True:
            yield token
            token = sample(self.target.extend((token,))[-1])
            stats.target_calls += 1

    # ---- the decode loop ------------------------------------------------------------------------------------
    def generate_step(self, prompt_ids: Sequence[int], sampling: SamplingParams = SamplingParams(),
                      max_tokens: int = 256) -> Iterator[int]:
        """Yield generated token ids until an end-of-sequence token or max_tokens. Statistics in last_stats."""
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty; give at least one token")
        if max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
        self._settle()  # nothing is timed while pages are still moving
        sample = make_sampler(sampling)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits, stats.prefilled_tokens = self.target.sync(prompt_ids)
        if self.drafter is not None:
            self.drafter.reset()
            self.drafter.prime(prompt_ids)  # a model draft reads the prompt here, as part of the prefill
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        if self.drafter is None:
            steps = self._plain_steps(logits, sample, stats)
        else:
            steps = speculative_steps(self.target, self.drafter, self.draft_length, logits, list(prompt_ids),
                                      sampling.greedy, sample, make_logits_processor(sampling), sample.rng, stats)
        try:
            for token in steps:
                if token in self.eos:
                    stats.finish_reason = "stop"
                    break
                stats.generated_tokens += 1
                stats.decode_seconds = time.perf_counter() - t1
                yield token
                if stats.generated_tokens >= max_tokens:
                    stats.finish_reason = "length"
                    break
        finally:
            steps.close()
            stats.decode_seconds = time.perf_counter() - t1

    def stream_generate(self, prompt_ids: Sequence[int], sampling: SamplingParams = SamplingParams(),
                        max_tokens: int = 256) -> Iterator[str]:
        detok = StreamingDetokenizer(self.tokenizer)
        for token in self.generate_step(prompt_ids, sampling, max_tokens):
            if piece := detok.add(token):
                yield piece
        if tail := detok.flush():
            yield tail

    def generate(self, prompt: str, sampling: SamplingParams = SamplingParams(), max_tokens: int = 256,
                 chat: bool = True) -> str:
        """Answer one prompt; with chat=True it is wrapped in the chat template as a user message."""
        ids = self.chat_ids([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)
        return "".join(self.stream_generate(ids, sampling, max_tokens))
