"""A run's memory per GPU and its cost, before any GPU is spent (``tools/plan_run.py``).

Arithmetic on the recipe (no GPU, no process group, no model built), so a 512-GPU run is
planned on a laptop. For every pipeline stage of the recipe's TP x PP x DP layout:

- **weights**: the stage's parameters on one tensor-parallel rank (norm weights are replicated
  over TP; the embedding sits on the first stage, the final norm and LM head on the last; a
  tied LM head on PP > 1 is a second copy on the last stage), x 2 bytes in bf16, 4 in fp32.
- **gradients**: megatron-core's DDP gradient buffer, for trainable parameters only (frozen
  ones get none: ``stages.set_trainable`` runs before wrapping): 4 bytes each with
  ``ddp.grad_reduce_in_fp32`` or fp32 parameters, else 2.
- **optimizer state**: Adam's two fp32 moments, plus the fp32 master copy in bf16 (12 bytes
  per trainable parameter; 8 in fp32, where the parameters are the master copy; + 4 for the fp32
  gradient copy when the buffer is bf16), divided over the DP ranks with the distributed
  optimizer. Buffer padding (< 0.1%) and Adam's step counters are left out.
- **activations**: the tensors one micro-batch's forward pass keeps for the backward pass,
  enumerated one by one from what the layers of this project save (:func:`saved_activations`:
  megatron-core's local and Transformer Engine specs, the core attention of
  ``model/attention.py``), times the micro-batches the pipeline schedule holds at its peak.
  Without recomputation, with selective (core attention) and with full recomputation (only each
  block's input kept, plus one block re-created during its backward). The core attention's
  share is reported: what the backend itself keeps (its q, k, v inputs included), the
  ``[b, 1, s, s]`` mask and ``[b, heads, s, s]`` probabilities of the dense backend, the block
  mask of FlexAttention.

Model FLOPs per token are ``ArchConfig.training_flops_per_token`` (the MFU logger's), so
GPU-hours at a given MFU are comparable with the MFU a run logs.

What the estimate does not count is left to a stated margin (``PlanOptions.margin``): the CUDA
context and NCCL buffers, allocator fragmentation, operator workspaces, and the temporaries
of the backward pass (the gradient of the logits, each layer's gradients of its activations).
The activation accounting is checked against the tensors a built model really saves
(``benchmarks/plan_run_check.py``, ``tests/tools/test_plan_run.py``) with the local layers on
CPU; Transformer Engine's layers and FlexAttention cannot run there, so their terms are modelled
on the measured ones (TE's norm fused into the next linear keeps its bf16 input and the linear's
input; FlexAttention keeps what SDPA keeps, plus its block mask), unmeasured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from megatron_normistral.model.architectures import ArchConfig

GIB = 1024**3
RECOMPUTE_MODES = ("none", "selective", "full")
Recompute = Literal["none", "selective", "full"]
Backend = Literal["flex", "sdpa", "dense"]
Impl = Literal["local", "transformer_engine"]
# FlexAttention's tile (model/attention.py's FLEX_BLOCK_SIZE; not imported: that module imports torch).
FLEX_BLOCK_SIZE = 128

# The parts a micro-batch's saved activations are reported in.
PART_EMBEDDING = "embedding"
PART_NORMS = "norms"
PART_PROJECTIONS = "attention projections"  # QKV and output projections, RoPE
PART_CORE_ATTENTION = "core attention"
PART_MLP = "MLP"
PART_HEAD = "LM head and loss"
PART_CHECKPOINTS = "recomputation inputs"
PARTS = (PART_EMBEDDING, PART_NORMS, PART_PROJECTIONS, PART_CORE_ATTENTION, PART_MLP, PART_HEAD, PART_CHECKPOINTS)


@dataclass
class PlanOptions:
    """What the recipe does not say about the planned run (``tools/plan_run.py``'s flags)."""

    gpus: int
    """Number of GPUs of the run (world size); DP = GPUs / (TP x PP)."""

    gpu_memory_gib: float
    """Memory of one GPU in GiB (e.g. 80 for an H100, 141 for an H200, 64 for one MI250X GCD)."""

    mfu: float = 0.4
    """Model FLOPs utilisation to assume for the GPU-hours (0 < MFU <= 1; recomputation is not
    counted as model FLOPs, so it shows up as a lower MFU)."""

    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one GPU (989 for an H100/H200 SXM, 191.5 for one MI250X GCD);
    default: the recipe's logging.peak_flops_per_device. Without either, no GPU-hours."""

    margin: float = 0.15
    """Fraction of the GPU memory kept free for what the plan does not count (CUDA context and
    NCCL buffers, allocator fragmentation, workspaces, gradient temporaries of the backward)."""

    attention_backend: Literal["auto", "flex", "sdpa", "dense"] | None = None
    """Core attention to plan for; default: the recipe's model.attention_backend (auto: flex on
    --device cuda, sdpa on cpu, as the run resolves it)."""

    transformer_impl: Literal["auto", "local", "transformer_engine"] | None = None
    """Layer implementation to plan for; default: the recipe's model.transformer_impl (auto:
    transformer_engine on --device cuda, as where it imports; local on cpu)."""

    device: Literal["cuda", "cpu"] = "cuda"
    """Where the run will compute: cuda (torch's fused RMSNorm keeps its input only) or cpu
    (torch decomposes RMSNorm and also keeps the normalised input; the measurement check runs there)."""

    def validate(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus {self.gpus}: must be >= 1")
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory {self.gpu_memory_gib}: must be > 0 (GiB)")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu {self.mfu}: must be in (0, 1]")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops {self.peak_tflops}: must be > 0")
        if not 0 <= self.margin < 1:
            raise ValueError(f"--margin {self.margin}: must be in [0, 1)")


# ------------------------------------------------------------------------------ activations

@dataclass(frozen=True)
class ActivationSetup:
    """What the saved activations of one micro-batch on one tensor-parallel rank depend on."""

    arch: ArchConfig
    seq_length: int
    micro_batch_size: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    fp8: bool = False
    attention_backend: Backend = "sdpa"
    transformer_impl: Impl = "local"
    recompute: Recompute = "none"
    recompute_num_layers: int = 1
    trainable: Literal["full", "embeddings"] = "full"
    fused_rms_norm: bool = True  # torch's CUDA kernel; on CPU F.rms_norm is decomposed into saved pieces
    one_document_per_sample: bool = False  # objective.attention causal (or batches without a description)


@dataclass
class SavedBytes:
    """Bytes saved for the backward pass, by part (:data:`PARTS`)."""

    by_part: dict[str, int] = field(default_factory=lambda: {part: 0 for part in PARTS})

    def add(self, part: str, nbytes: float) -> None:
        self.by_part[part] += int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    def plus(self, other: "SavedBytes", times: int = 1) -> "SavedBytes":
        return SavedBytes({p: self.by_part[p] + times * other.by_part[p] for p in PARTS})


def _norm(out: SavedBytes, s: ActivationSetup, rows: float, weight_trains: bool) -> None:
    """An RMSNorm over ``rows`` tokens of width h. Local (``model/specs.py``'s RMSNorm) computes
    in fp32: it keeps an fp32 copy of its input (the input itself in fp32), the inverse RMS, the
    fp32 copy of its weight in bf16, and, decomposed on CPU, the normalised input for the weight
    gradient. Transformer Engine's norm keeps its bf16 input and the inverse RMS."""
    h, e = s.arch.hidden_size, _act_bytes(s)
    if s.transformer_impl == "transformer_engine":
        out.add(PART_NORMS, rows * h * e + rows * 4)
        return
    out.add(PART_NORMS, rows * h * 4 + rows * 4)
    if s.bf16:
        out.add(PART_NORMS, h * 4)
    if not s.fused_rms_norm and weight_trains:
        out.add(PART_NORMS, rows * h * 4)


def _act_bytes(s: ActivationSetup) -> int:
    return 2 if s.bf16 else 4


def _linear_input_bytes(s: ActivationSetup) -> int:
    """A linear layer keeps its input for the weight gradient; Transformer Engine's FP8 layers
    keep it cast to FP8."""
    return 1 if s.fp8 and s.transformer_impl == "transformer_engine" else _act_bytes(s)


def _rows(s: ActivationSetup) -> tuple[int, float]:
    """(tokens of the micro-batch, tokens of the residual stream on this TP rank: 1/TP of them
    under sequence parallelism)."""
    tokens = s.seq_length * s.micro_batch_size
    return tokens, tokens / s.tensor_parallel if s.sequence_parallel else tokens


def layer_saved(s: ActivationSetup, recompute: Recompute | None = None) -> SavedBytes:
    """What one transformer layer keeps for its backward pass (one micro-batch, one TP rank),
    tensor by tensor, without full recomputation (``recompute`` 'none' or 'selective'; default:
    the setup's, with 'full' read as 'none': the layer as its recomputation re-creates it)."""
    recompute = s.recompute if recompute is None else recompute
    a, t = s.arch, s.tensor_parallel
    tokens, rows = _rows(s)
    e, lin = _act_bytes(s), _linear_input_bytes(s)
    b, seq, d = s.micro_batch_size, s.seq_length, a.head_dim
    heads = a.num_attention_heads // t
    q_width, kv_width, ffn = a.query_width // t, a.kv_width // t, a.ffn_hidden_size // t
    trains = s.trainable == "full"  # stage 2: every weight of the layer is frozen
    out = SavedBytes()

    # Input norm and QKV projection (Transformer Engine fuses them: the norm's output is the
    # linear's saved input, kept only for the weight gradient; megatron-core's frozen linear
    # keeps no input).
    _norm(out, s, rows, weight_trains=trains)
    if trains:
        out.add(PART_PROJECTIONS, rows * a.hidden_size * lin)
    # RoPE on q and k: cos and sin of the positions, computed per call in the activation dtype.
    out.add(PART_PROJECTIONS, 4 * seq * d * e)

    qkv_storage = tokens * (q_width + 2 * kv_width) * e  # v is a view of the QKV output
    q_rope, k_rope = tokens * q_width * e, tokens * kv_width * e
    repeat_kv = a.num_query_groups != a.num_attention_heads
    if recompute == "selective":
        # The checkpointed core attention keeps its inputs q, k, v (and a 4-byte mask-type tensor).
        out.add(PART_CORE_ATTENTION, q_rope + k_rope + qkv_storage + 4)
    elif s.attention_backend in ("sdpa", "flex"):
        # Flash-style kernels keep q, k, v, the output and the log-sum-exp (fp32, per head and
        # query); SDPA per document keeps pieces of the same tensors.
        out.add(PART_CORE_ATTENTION, q_rope + k_rope + qkv_storage + tokens * q_width * e + b * heads * seq * 4)
    else:
        # megatron-core's DotProductAttention: q, k and v repeated to every head (GQA), the
        # softmax probabilities [b, heads, s, s] (in fp32, and their bf16 cast for the matmul).
        kv = 2 * tokens * q_width * e if repeat_kv else k_rope + qkv_storage
        probs = b * heads * seq * seq * (4 + 2 if s.bf16 else 4)
        out.add(PART_CORE_ATTENTION, q_rope + kv + probs)
    # The output projection's input is the core attention's output as [s, b, heads x d].
    # FlexAttention writes its output in the query's memory order ([s, b, ...]), and one SDPA
    # call over a micro-batch of one sample does too ([b, s, ...] with b = 1), so there it is a
    # view of the output the kernel keeps; per-document SDPA concatenates its pieces, dense
    # attention permutes its result, and b > 1 SDPA output is [b, s, ...]: a copy.
    output_is_view = recompute != "selective" and (
        s.attention_backend == "flex"
        or (s.attention_backend == "sdpa" and s.one_document_per_sample and b == 1))
    if trains and not (output_is_view and lin == e):
        out.add(PART_PROJECTIONS, tokens * q_width * lin)

    # MLP: norm, fc1 (gate and up fused), SwiGLU, fc2.
    _norm(out, s, rows, weight_trains=trains)
    if trains:
        out.add(PART_MLP, rows * a.hidden_size * lin)
    # fc1's output (SiLU keeps the gate half, a view of it), SiLU's output and the up half plus
    # megatron-core's glu_linear_offset (a new tensor), both kept by the product.
    out.add(PART_MLP, tokens * 2 * ffn * e + 2 * tokens * ffn * e)
    if trains:
        out.add(PART_MLP, tokens * ffn * lin)  # fc2 input
    return out


def micro_batch_shared(s: ActivationSetup, recompute: Recompute | None = None) -> SavedBytes:
    """What a micro-batch keeps once for all layers of a stage: the dense mask or FlexAttention's
    block mask (both built once per micro-batch from the document description), and the RoPE
    frequencies full recomputation keeps for its blocks."""
    recompute = s.recompute if recompute is None else recompute
    b, seq = s.micro_batch_size, s.seq_length
    out = SavedBytes()
    if recompute == "full":
        out.add(PART_CHECKPOINTS, seq * s.arch.head_dim * 4)
        return out
    if recompute == "selective":
        return out
    if s.attention_backend == "dense":
        out.add(PART_CORE_ATTENTION, b * seq * seq)  # bool [b, 1, s, s]
    elif s.attention_backend == "flex":
        blocks = -(-seq // FLEX_BLOCK_SIZE)
        # Block counts and indices (partial and full blocks, by key and by query: int32
        # [b, 1, n] and [b, 1, n, n]), plus the document ids and modes the mask function reads.
        out.add(PART_CORE_ATTENTION, 4 * b * blocks * 4 + 4 * b * blocks * blocks * 4 + b * blocks * FLEX_BLOCK_SIZE * 4 + b)
    return out


def embedding_saved(s: ActivationSetup) -> SavedBytes:
    """The first stage's embedding lookup keeps the token ids (int64); with TP > 1 the
    vocabulary-parallel embedding keeps its shifted ids and the out-of-shard mask instead."""
    tokens, _ = _rows(s)
    out = SavedBytes()
    out.add(PART_EMBEDDING, tokens * 8 if s.tensor_parallel == 1 else tokens * (8 + 1))
    return out


def head_saved(s: ActivationSetup) -> SavedBytes:
    """The last stage: final norm, LM head input (the head always trains), and the
    vocabulary-parallel cross entropy's fp32 softmax of the logits [tokens, vocab / TP], its
    in-shard target mask and shifted targets."""
    tokens, rows = _rows(s)
    out = SavedBytes()
    _norm(out, s, rows, weight_trains=s.trainable == "full")
    out.add(PART_HEAD, rows * s.arch.hidden_size * _act_bytes(s))
    out.add(PART_HEAD, tokens * (s.arch.vocab_size // s.tensor_parallel) * 4 + tokens * (1 + 8))
    return out


def saved_activations(s: ActivationSetup, layers: int, first_stage: bool, last_stage: bool) -> tuple[SavedBytes, int]:
    """(bytes one micro-batch's forward keeps on a stage of ``layers`` layers, bytes one
    recomputed block re-creates during its backward: 0 unless full recomputation)."""
    total = SavedBytes()
    if first_stage:
        total = total.plus(embedding_saved(s))
    working = 0
    if s.recompute == "full":
        _, rows = _rows(s)
        per_block = min(s.recompute_num_layers, layers) if layers else 0
        blocks = -(-layers // s.recompute_num_layers)
        total.add(PART_CHECKPOINTS, blocks * rows * s.arch.hidden_size * _act_bytes(s))
        if layers:
            working = per_block * layer_saved(s, "none").total + micro_batch_shared(s, "none").total
    else:
        total = total.plus(layer_saved(s), times=layers)
    if layers:
        total = total.plus(micro_batch_shared(s))
    if last_stage:
        total = total.plus(head_saved(s))
    return total, working


# ------------------------------------------------------------------------------ parameters

def stage_parameters(arch: ArchConfig, tp: int, pp: int, stage: int, trainable: str) -> tuple[int, int]:
    """(parameters, trainable parameters) of one tensor-parallel rank of pipeline stage
    ``stage``: its layers (projections and MLP split over TP, norm weights replicated), the
    embedding on the first stage, the final norm and LM head on the last (a second copy of
    tied embeddings there when PP > 1)."""
    h = arch.hidden_size
    layers = arch.num_layers // pp
    norms = 2 * h
    per_layer = (arch.layer_parameters() - norms) // tp + norms
    embedding = arch.vocab_size * h // tp
    params, trains = layers * per_layer, 0
    if stage == 0:
        params += embedding
        trains += embedding
    if stage == pp - 1:
        params += h
        if arch.untie_embeddings or pp > 1:
            params += embedding
            trains += embedding
    if trainable == "full":
        trains = params
    return params, trains


# ------------------------------------------------------------------------------ the plan

@dataclass
class ActivationMemory:
    """Activations of one pipeline stage under one recomputation mode."""

    per_micro_batch: int  # bytes kept by one micro-batch's forward
    by_part: dict[str, int]
    in_flight: float  # micro-batches whose activations the schedule holds at its peak
    recompute_working: int  # full recomputation: one block re-created during its backward

    @property
    def core_attention(self) -> int:
        return self.by_part[PART_CORE_ATTENTION]

    @property
    def peak(self) -> int:
        return round(self.in_flight * self.per_micro_batch) + self.recompute_working


@dataclass
class StageMemory:
    stage: int
    layers: int
    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: dict[str, ActivationMemory]

    def total(self, recompute: str) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations[recompute].peak


@dataclass
class RunPlan:
    recipe: str
    arch: str
    vocab_size: int
    parameters: int
    trainable: str
    gpus: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int | None
    data_parallel: int
    sequence_parallel: bool
    distributed_optimizer: bool
    micro_batch_size: int
    micro_batches_per_step: int
    seq_length: int
    global_batch_size: int
    train_iters: int
    precision: str
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes_per_param: float  # before the DP split
    attention_backend: str
    transformer_impl: str
    device: str
    recompute: str  # the recipe's
    stages: list[StageMemory]
    gpu_memory: int
    margin: float
    tokens: int
    flops_per_token: float
    mfu: float
    peak_flops: float | None
    notes: list[str]

    @property
    def usable_memory(self) -> int:
        return int(self.gpu_memory * (1 - self.margin))

    def peak(self, recompute: str) -> int:
        return max(stage.total(recompute) for stage in self.stages)

    def worst_stage(self, recompute: str) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total(recompute))

    def fits(self, recompute: str | None = None) -> bool:
        return self.peak(recompute or self.recompute) <= self.usable_memory

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def gpu_hours(self) -> float | None:
        if self.peak_flops is None:
            return None
        return self.total_flops / (self.mfu * self.peak_flops) / 3600

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for stage, raw in zip(self.stages, data["stages"]):
            raw["total"] = {mode: stage.total(mode) for mode in RECOMPUTE_MODES}
            for mode, act in stage.activations.items():
                raw["activations"][mode]["peak"] = act.peak
        data.update(usable_memory=self.usable_memory, fits=self.fits(),
                    fits_by_recompute={mode: self.fits(mode) for mode in RECOMPUTE_MODES},
                    peak_by_recompute={mode: self.peak(mode) for mode in RECOMPUTE_MODES},
                    total_flops=self.total_flops, gpu_hours=self.gpu_hours,
                    wall_hours=None if self.gpu_hours is None else self.gpu_hours / self.gpus)
        return data


def micro_batches_in_flight(pp: int, vpp: int | None, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations pipeline stage ``stage`` holds at its peak, in units of
    all its layers. 1F1B: stage r runs pp - r forward passes before its first backward (the
    first stage holds pp, the last one). Interleaved (megatron-core's schedule): stage r's
    warm-up is 2 (pp - r - 1) + (vpp - 1) pp chunk forwards, plus the one in steady state, each
    1/vpp of its layers; for r = 0 that is pp (1 + (pp - 1) / (pp vpp)) micro-batches, Megatron-LM's
    interleaving penalty. Never more than a step's micro-batches."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, micro_batches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)
    return chunks / vpp


def _resolve(options: PlanOptions, model) -> tuple[str, str, list[str]]:
    backend = options.attention_backend or model.attention_backend
    impl = options.transformer_impl or model.transformer_impl
    notes = []
    if backend == "auto":
        backend = "flex" if options.device == "cuda" else "sdpa"
        notes.append(f"attention_backend auto: {backend}, as the run resolves it on {options.device}")
    if impl == "auto":
        impl = "transformer_engine" if options.device == "cuda" else "local"
        if options.device == "cuda":
            notes.append("transformer_impl auto: planned with Transformer Engine layers (where it imports on CUDA); "
                         "--transformer-impl local for megatron-core's local layers")
    if impl == "transformer_engine" or backend == "flex":
        notes.append("Transformer Engine layers and FlexAttention do not run on CPU: their activation terms are "
                     "modelled on the local layers' and SDPA's, which are measured (benchmarks/plan_run_check.py); "
                     "these are not")
    return backend, impl, notes


def plan_run(recipe, options: PlanOptions, name: str = "recipe") -> RunPlan:
    """The plan of ``recipe`` (a :class:`~megatron_normistral.config.recipe.Recipe`) on
    ``options.gpus`` GPUs. Bad settings raise ``ValueError`` with one line."""
    from megatron_normistral.model.provider import validate_layout

    options.validate()
    arch = recipe.model.architecture()
    p, t, prec = recipe.parallel, recipe.training, recipe.precision
    p.resolve_virtual_stages(arch.num_layers)
    p.validate(options.gpus)
    validate_layout(arch, p)
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    dp = p.data_parallel_size(options.gpus)
    for flag, value in (("--micro-batch-size", t.micro_batch_size), ("--global-batch-size", t.global_batch_size),
                        ("--seq-length", t.seq_length)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(f"global batch {t.global_batch_size} is not divisible by micro-batch x data-parallel = "
                         f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp} (at {options.gpus} GPUs)")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    if getattr(recipe.optimizer, "optimizer", "adam") != "adam":
        raise ValueError(f"optimizer {recipe.optimizer.optimizer!r}: the plan knows Adam only")
    backend, impl, notes = _resolve(options, recipe.model)
    if backend not in ("flex", "sdpa", "dense"):
        raise ValueError(f"attention backend {backend!r}: expected auto, flex, sdpa or dense")
    fp8 = prec.fp8_format is not None
    if fp8 and impl != "transformer_engine":
        raise ValueError(f"fp8_format={prec.fp8_format!r} needs Transformer Engine layers; the plan uses {impl}")

    trainable = recipe.stage.trainable
    if trainable == "embeddings" and recipe.stage.switch_to_full_at is not None and recipe.stage.switch_to_full_at <= t.train_iters:
        notes.append(f"stage.switch_to_full_at {recipe.stage.switch_to_full_at}: planned as full training (its peak)")
        trainable = "full"
    weight_bytes = 2 if prec.bf16 else 4
    gradient_bytes = 4 if (recipe.ddp.grad_reduce_in_fp32 or not prec.bf16) else 2
    # fp32 master weights and both Adam moments; fp32 runs keep no master copy; a bf16 gradient
    # buffer gets an fp32 copy per main parameter at the step.
    optimizer_per_param = (12 + (4 if gradient_bytes == 2 else 0)) if prec.bf16 else 8
    if fp8:
        notes.append("fp8: linear inputs kept in FP8 (1 byte); FP8 weight copies are not counted")
    if trainable == "embeddings":
        notes.append("training embeddings only: frozen layers compute no weight gradients, so the run executes about "
                     "2/3 of the model FLOPs counted here; the MFU the run logs uses the same count (it reads higher)")
    recompute = recipe.model.recompute_granularity or "none"

    stages = []
    for stage in range(pp):
        params, trains = stage_parameters(arch, tp, pp, stage, trainable)
        layers = arch.num_layers // pp
        in_flight = micro_batches_in_flight(pp, vpp, stage, micro_batches)
        activations = {}
        for mode in RECOMPUTE_MODES:
            setup = ActivationSetup(
                arch=arch, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size, tensor_parallel=tp,
                sequence_parallel=p.sequence_parallel, bf16=prec.bf16, fp8=fp8, attention_backend=backend,
                transformer_impl=impl, recompute=mode, recompute_num_layers=recipe.model.recompute_num_layers,
                trainable=trainable, fused_rms_norm=options.device == "cuda",
                one_document_per_sample=recipe.objective.attention == "causal",
            )
            saved, working = saved_activations(setup, layers, stage == 0, stage == pp - 1)
            activations[mode] = ActivationMemory(saved.total, saved.by_part, in_flight, working)
        optimizer = trains * optimizer_per_param / (dp if p.use_distributed_optimizer else 1)
        stages.append(StageMemory(stage, layers, params, trains, params * weight_bytes, trains * gradient_bytes,
                                  int(optimizer), activations))

    peak_flops = options.peak_tflops * 1e12 if options.peak_tflops else recipe.logging.peak_flops_per_device
    precision = ("fp8 " + prec.fp8_format + " + bf16") if fp8 else ("bf16" if prec.bf16 else "fp32")
    return RunPlan(
        recipe=name, arch=arch.name, vocab_size=arch.vocab_size, parameters=arch.num_parameters(), trainable=trainable, gpus=options.gpus,
        tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp, data_parallel=dp,
        sequence_parallel=p.sequence_parallel, distributed_optimizer=p.use_distributed_optimizer,
        micro_batch_size=t.micro_batch_size, micro_batches_per_step=micro_batches, seq_length=t.seq_length,
        global_batch_size=t.global_batch_size, train_iters=t.train_iters, precision=precision,
        weight_bytes=weight_bytes, gradient_bytes=gradient_bytes, optimizer_bytes_per_param=optimizer_per_param,
        attention_backend=backend, transformer_impl=impl, device=options.device, recompute=recompute, stages=stages,
        gpu_memory=int(options.gpu_memory_gib * GIB), margin=options.margin,
        tokens=t.train_iters * t.global_batch_size * t.seq_length,
        flops_per_token=arch.training_flops_per_token(t.seq_length), mfu=options.mfu, peak_flops=peak_flops,
        notes=notes,
    )


# ------------------------------------------------------------------------------ text

def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: RunPlan) -> str:
    """The plan as the lines ``tools/plan_run.py`` prints."""
    shown = [plan.stages[0]] + ([plan.stages[-1]] if len(plan.stages) > 1 else [])
    lines = [
        f"{plan.recipe}: {plan.arch} (vocabulary {plan.vocab_size:,}), {_count(plan.parameters)} parameters, "
        f"training {plan.trainable}",
        f"layout: {plan.gpus} GPUs = TP {plan.tensor_parallel} x PP {plan.pipeline_parallel}"
        + (f" (VPP {plan.virtual_pipeline})" if plan.virtual_pipeline else "") + f" x DP {plan.data_parallel}; "
        f"sequence parallel {'on' if plan.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if plan.distributed_optimizer else 'off'}; micro-batch {plan.micro_batch_size} x {plan.seq_length:,} "
        f"tokens, {plan.micro_batches_per_step} micro-batches per step per DP rank",
        f"precision {plan.precision}, gradients {plan.gradient_bytes * 8}-bit; {plan.transformer_impl} layers, "
        f"{plan.attention_backend} attention, on {plan.device}; recipe's recomputation: {plan.recompute}",
        "",
        f"memory per GPU (GiB){'':22}" + "".join(f"{f'stage {s.stage}':>12}" for s in shown),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"  {label:<40}" + "".join(f"{v:>12}" for v in values))

    row("parameters", [_count(s.parameters) for s in shown])
    row(f"weights ({plan.weight_bytes} B/param)", [_gib(s.weights) for s in shown])
    row(f"gradients ({plan.gradient_bytes} B/trainable)", [_gib(s.gradients) for s in shown])
    split = f" / DP {plan.data_parallel}" if plan.distributed_optimizer else ""
    row(f"optimizer ({plan.optimizer_bytes_per_param:g} B/trainable{split})", [_gib(s.optimizer) for s in shown])
    row("micro-batches in flight", [f"{s.activations['none'].in_flight:g}" for s in shown])
    for mode in RECOMPUTE_MODES:
        label = {"none": "activations, no recomputation", "selective": "activations, selective recompute",
                 "full": "activations, full recompute"}[mode]
        row(label, [_gib(s.activations[mode].peak) for s in shown])
        row(f"  of which core attention ({plan.attention_backend})",
            [_gib(round(s.activations[mode].in_flight * s.activations[mode].core_attention)) for s in shown])
    for mode in RECOMPUTE_MODES:
        row(f"total, {mode} recomputation", [_gib(s.total(mode)) for s in shown])
    lines.append("")
    usable = (f"{_gib(plan.usable_memory)} GiB usable = {plan.gpu_memory / GIB:g} GiB minus a "
              f"{100 * plan.margin:g}% margin (CUDA context, NCCL buffers, fragmentation, backward temporaries)")
    worst = plan.worst_stage(plan.recompute)
    verdict = "fits" if plan.fits() else "does not fit"
    lines.append(f"{verdict}: {_gib(plan.peak(plan.recompute))} GiB on stage {worst.stage} with the recipe's "
                 f"recomputation ({plan.recompute}), of {usable}")
    others = [mode for mode in RECOMPUTE_MODES if mode != plan.recompute]
    lines.append("  with " + "; with ".join(
        f"{mode} recomputation: {_gib(plan.peak(mode))} GiB, {'fits' if plan.fits(mode) else 'does not fit'}"
        for mode in others))
    lines.append("")
    lines.append(f"tokens: {plan.train_iters:,} steps x {plan.global_batch_size:,} x {plan.seq_length:,} = "
                 f"{_count(plan.tokens)}; {plan.flops_per_token:.3e} model FLOPs per token "
                 f"(ArchConfig.training_flops_per_token), {plan.total_flops:.3e} in all")
    if plan.gpu_hours is None:
        lines.append("GPU-hours: give --peak-tflops (or logging.peak_flops_per_device in the recipe)")
    else:
        wall = plan.gpu_hours / plan.gpus
        lines.append(f"GPU-hours at MFU {plan.mfu:g} of {plan.peak_flops / 1e12:g} TFLOP/s per GPU: "
                     f"{plan.gpu_hours:,.0f} ({wall:,.1f} h = {wall / 24:.1f} days on {plan.gpus} GPUs)")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


__all__ = ["ActivationSetup", "PlanOptions", "RunPlan", "SavedBytes", "StageMemory", "format_plan",
           "layer_saved", "micro_batches_in_flight", "plan_run", "saved_activations", "stage_parameters"]
