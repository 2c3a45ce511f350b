"""Batched generation with KV cache: the one sampler behind eval, chat, data collection and RL.

Prompts are rendered with the chat template, left-padded into batches sorted by length
(so little compute goes to padding), and decoded with `model.generate` (KV cache on).
With n > 1 samples per prompt each distinct prompt of a batch is run through the model
once and its KV cache copied to the rows that sample from it (`shared_prompt_cache`). On a CPU
in fp32 (no native bf16) the linear layers compute from weights reordered once per call
(`models.prepacked`): 1.2–1.3× the sampled tokens/s of plain `F.linear` on an AVX2 CPU.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from rich.progress import track
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhfkit.config import Config, check, param
from rlhfkit.data.schemas import Conversation
from rlhfkit.data.tokenize import encode_prompt, pad_token_id
from rlhfkit.models.prepacked import prepacked_linears
from rlhfkit.ops.logprobs import split_causal_lm


@dataclass(frozen=True)
class SamplingConfig(Config):
    kind = "sampling"
    max_new_tokens: int = param(64, "longest response in tokens")
    temperature: float = param(0.0, "0 = greedy decoding")
    top_p: float = param(1.0, "nucleus sampling threshold")
    top_k: int = param(0, "sample from the k most likely tokens (0 = off)")
    n: int = param(1, "responses per prompt")
    batch_size: int = param(32, "sequences decoded together")
    stop: tuple[str, ...] = param((), "stop strings (besides the end-of-turn token)")
    seed: int = param(0, "sampling seed")

    def validate(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1")
        check(self.temperature >= 0, "temperature must be ≥ 0")
        check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        check(self.n >= 1, "n must be ≥ 1")
        check(self.batch_size >= 1, "batch_size must be ≥ 1")


@dataclass(frozen=True)
class Generation:
    prompt_index: int
    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool  # ended with end-of-turn / stop string rather than the token limit
    logprobs: tuple[float, ...] | None = None  # the sampler's log-prob of each response token, where it gives them


def finish_generation(tokenizer, prompt_index: int, prompt_ids: list[int], sampled: list[int],
                      stop_ids: list[int], stop: tuple[str, ...] | list[str] = (),
                      logprobs: list[float] | None = None) -> Generation:
    """A Generation from a sampler's tokens: cut after the first stop token (kept: the model
    learns to end its turn), the text decoded without stop and special tokens, cut at the first
    stop string (the tokens stay: the model sampled them); `finished` when either stopped it.
    `logprobs` (the sampler's, one per sampled token) are cut with the tokens."""
    toks, finished = list(sampled), False
    for pos, t in enumerate(toks):
        if t in stop_ids:
            toks, finished = toks[:pos + 1], True
            break
    text = tokenizer.decode([t for t in toks if t not in stop_ids], skip_special_tokens=True)
    for s in stop:
        if s in text:
            text, finished = text[:text.index(s)], True
    kept = None if logprobs is None else tuple(logprobs[:len(toks)])
    return Generation(prompt_index, text.strip(), list(prompt_ids), toks, finished, kept)


def stop_token_ids(tokenizer) -> list[int]:
    """Every id that ends a generation: eos and the chat formats' end tokens the vocabulary has
    (a multi-turn episode ends a model turn on eos alone: `rollout.episodes.stop_ids`)."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Conversation], cfg: SamplingConfig = SamplingConfig(),
             *, progress: bool = False) -> list[Generation]:
    """n responses for each prompt, in prompt order (prompt i's samples at i·n … i·n+n−1)."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.n)]
    order = sorted(range(len(jobs)), key=lambda j: len(encoded[jobs[j][0]]))
    pad = pad_token_id(tokenizer)
    stop_ids = stop_token_ids(tokenizer)
    results: list[Generation | None] = [None] * len(jobs)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    iterator = batches
    if progress:
        iterator = track(batches, description="generating", transient=True)
    with prepacked_linears(model, rows=min(cfg.batch_size, len(jobs))):
        for batch in iterator:
            seqs = [encoded[jobs[j][0]] for j in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, width - len(s):] = torch.tensor(s)
                attn[r, width - len(s):] = 1
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad,
                          use_cache=True)
            ids, attn = ids.to(device), attn.to(device)
            cache = shared_prompt_cache(model, ids, attn, [jobs[j][0] for j in batch])
            if cache is not None:
                kwargs[cache_argument(model)] = cache
            # Sampling runs as the last logits processor (`sampling_processors`), so `generate` itself
            # decodes greedily in both cases: its argmax picks the sampled token.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if cfg.temperature > 0:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                kwargs["logits_processor"] = sampling_processors(cfg, torch.Generator().manual_seed(seed))
            if cfg.stop:
                kwargs.update(stop_strings=list(cfg.stop), tokenizer=tokenizer)
            out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
            new = out[:, width:].cpu()
            for r, j in enumerate(batch):
                i = jobs[j][0]
                results[j] = finish_generation(tokenizer, i, encoded[i], new[r].tolist(), stop_ids, cfg.stop)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


class InverseCDFSampler(LogitsProcessor):
    """Draw each row's next token from softmax(scores) with one uniform number, by inverting
    the cumulative distribution, and return scores with all the mass on it (0 there, −inf
    elsewhere), so `generate`'s greedy step picks the drawn token.

        F_v = Σ_{w ≤ v} p_w,   u ~ U[0, F_V),   token = min{v : F_v > u}

    Same distribution as `torch.multinomial` (what `generate(do_sample=True)` calls), which
    draws one exponential variate per vocabulary entry: 1.6 M per decoding step for 32 rows of
    a 49,152-token vocabulary, a quarter of all decoding time on a 2-core CPU. Here a step costs
    one cumulative sum (fp64, so rounding cannot move mass between tokens) and a binary search
    per row. Tokens of probability 0 (after top-k / top-p) are never drawn. `generator` (CPU)
    makes the draws a pure function of its seed.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum_(-1)
        u = torch.rand((scores.shape[0], 1), generator=self.generator, dtype=torch.float64).to(scores.device)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def sampling_processors(cfg: SamplingConfig, generator: torch.Generator) -> LogitsProcessorList:
    """temperature → top-k → top-p (transformers' own warpers, in `generate`'s order) → the draw."""
    processors: list[LogitsProcessor] = []
    if cfg.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k > 0:
        processors.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        processors.append(TopPLogitsWarper(cfg.top_p))
    processors.append(InverseCDFSampler(generator))
    return LogitsProcessorList(processors)


def cache_argument(model) -> str:
    """The keyword a model's forward and `generate` take a KV cache by: `cache` from
    transformers 5.2x on, `past_key_values` before (still accepted, with a warning)."""
    params = inspect.signature(split_causal_lm(model).backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def shared_prompt_cache(model, ids: torch.Tensor, attn: torch.Tensor, prompt_of_row: list[int]):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt.

    ids, attn: (B, W) left-padded rows; rows with the same `prompt_of_row` hold the same
    prompt. The distinct prompts' first W − 1 tokens go through the backbone once (no LM
    head), then the cache is gathered to the B rows; `generate` given this cache feeds only
    the last prompt token, so the n samples of a prompt share one prefill instead of n.
    Position ids follow `generate`'s own rule for left padding (cumsum of the mask − 1).
    Returns None when no prompt repeats in the batch (nothing to share) or W < 2.
    """
    distinct = list(dict.fromkeys(prompt_of_row))
    if len(distinct) == len(prompt_of_row) or ids.shape[1] < 2:
        return None
    first_row = {p: prompt_of_row.index(p) for p in distinct}
    unique = torch.tensor([first_row[p] for p in distinct], device=ids.device)
    u_ids, u_attn = ids[unique, :-1], attn[unique, :-1]
    positions = (u_attn.long().cumsum(-1) - 1).masked_fill(u_attn == 0, 1)
    cache = DynamicCache(config=model.config)
    split_causal_lm(model).backbone(input_ids=u_ids, attention_mask=u_attn, position_ids=positions,
                                    use_cache=True, **{cache_argument(model): cache})
    slot = {p: k for k, p in enumerate(distinct)}
    cache.batch_select_indices(torch.tensor([slot[p] for p in prompt_of_row], device=ids.device))
    return cache


class PolicySampler:
    """The generation engine of an online run: it decodes with its own copy of the policy.

    Training keeps fp32 master weights (bf16 autocast casts them at every forward); decoding
    with them would run every KV-cache step in fp32, or re-cast all weights per token under
    autocast. So the sampler holds a copy in the compute dtype (bf16 when the run trains in
    bf16) and `sync` refreshes it from the policy before each rollout — the same contract a
    separate inference engine (vLLM) has: weights pushed to it after each update.

    With `dtype=None` (fp32 runs) it decodes with the policy module itself and `sync` is free;
    each `generate` call reorders the linear weights as they are then (`models.prepacked`).
    The copy decodes with PyTorch's SDPA attention (`attention`), whatever kernel training
    uses: for one query token per step it is the fastest on CPU (bf16 + SDPA ≈ 155 sampled
    tokens/s for 32 rows of the embedded model on 2 cores, vs ≈ 135 with matmul attention and
    ≈ 80 in fp32; ≈ 175–215 with the shared prompt prefill and the inverse-CDF draw).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None, *, attention: str | None = "sdpa"):
        self.policy = model
        self.dtype = dtype
        self.model = model if dtype is None else copy.deepcopy(model).to(dtype).eval()
        if self.model is not model and attention and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(attention)
        self.syncs = 0

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights into the sampler's (cast to its dtype)."""
        if self.model is self.policy:
            return
        src = dict(self.policy.named_parameters())
        for name, p in self.model.named_parameters():
            p.copy_(src[name])
        self.syncs += 1

    def generate(self, tokenizer, prompts: list[Conversation], cfg: SamplingConfig, *,
                 progress: bool = False) -> list[Generation]:
        return generate(self.model, tokenizer, prompts, cfg, progress=progress)
