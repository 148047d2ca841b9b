"""ModelConfig and TrainConfig dataclasses plus the named presets (cpu-smoke, cpu-tiny, probe, gpu-d20).

Every field is also a command-line flag (see `recurchat train --help`). Naming: R, the number of shared blocks, is
`n_shared`; r, the number of iterations, is everything named `*_recur` (`num_recur` per call, `mean_recur` = r̄,
`r_max`, `max_recur` for adaptive exit). "Depth" means iterations per token only. Exercised by
`pytest tests/test_config.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from recurchat.errors import UserError

ADAPTERS = ("concat", "add", "parcae")  # parcae: constrained injection Ā ⊙ s + Δ ⊙ (B e), 0 < Ā < 1
# Initial weight of the concat adapter u = W·[e, s]: e = [I | 0] (reads e only), s = [0 | I] (reads the state only:
# an unrolled deep net), mean = [I/2 | I/2], random = uniform with std 1/sqrt(2d) (Huginn-like).
ADAPTER_INITS = ("e", "s", "mean", "random")
STATE_INITS = ("e", "zeros", "noise")
TWINS = ("iso-flops", "iso-params")  # the standard baselines: same FLOPs/token at r̄, or same parameter count
PARALLEL_MODES = ("ddp", "fsdp")
DTYPES = ("auto", "bf16", "fp32")  # resolved per device by model/hardware.py
# Old field name → new. R (shared blocks) and r (iterations) once read n_recur and num_recur; checkpoints and
# command lines that use an old name keep working (the CLI prints a deprecation note).
RENAMED_FIELDS = {"n_recur": "n_shared"}
# Fields added after checkpoints were already written, with the value that reproduces those checkpoints' model
# (their defaults today may differ: a saved config without the field meant the behaviour before it existed).
ADDED_FIELDS = {"adapter_init": "e", "state_norm": False, "sandwich_norm": False, "qk_gain": False,
                "attn_window": 0, "mlp": "relu2", "mlp_hidden": 0, "qk_norm": True, "norm_eps": 0.0,
                "embed_norm": True, "tie_embeddings": False, "final_norm_gain": False, "rope_convention": "nanochat"}
MLP_KINDS = ("relu2", "swiglu")  # model/layers.py's MLP
ROPE_CONVENTIONS = ("nanochat", "llama")  # model/layers.py's rotary_tables: pairs (i, i + D/2) rotated by −θ or +θ


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    mlp_ratio: int = 4
    n_prelude: int = 2
    n_shared: int = 2  # R: blocks in the shared recurrent stack (was n_recur); 0 makes the standard model
    n_coda: int = 2
    mean_recur: int = 4  # r̄: default r at evaluation and mean of the training distribution
    r_max: int = 16
    adapter: str = "concat"
    # Defaults from the depth ablation (docs/ablations/depth/): [I/2 | I/2] and a normalised state beat the earlier
    # [I | 0] without a state norm (adapter_init=e, state_norm=false: what checkpoints written before them use).
    adapter_init: str = "mean"  # concat adapter's starting weight: e | s | mean | random (ADAPTER_INITS)
    state_init: str = "e"
    state_noise_std: float = 1.0  # scale of the noise state (state_init = noise)
    state_norm: bool = True  # RMS-normalise the state after every iteration (its scale cannot drift with r)
    sandwich_norm: bool = False  # shared blocks normalise after each residual add (Huginn): x ← norm(x + f(norm(x)))
    qk_gain: bool = False  # a learned gain per attention head on the QK-normed logits (sharper attention)
    # > 0: every block attends to the last attn_window positions only, so information travels attn_window − 1
    # positions per layer and an answer t positions away needs iterations, not one wide look (0 = full causal)
    attn_window: int = 0
    seq_len: int = 256
    logit_softcap: float = 15.0  # 0 = none (Llama-family models)
    rope_base: float = 10000.0
    # Block family. nanochat's defaults below; an imported Llama-family model (interop/llama.py) sets mlp=swiglu
    # with the source's hidden size, qk_norm=false, its norm epsilon, embed_norm=false, tied embeddings with a
    # learned final-norm gain, no soft-cap and rope_convention=llama.
    mlp: str = "relu2"  # relu2 | swiglu
    mlp_hidden: int = 0  # MLP hidden width; 0 = mlp_ratio × d_model
    qk_norm: bool = True  # RMS-normalise queries and keys after rotary (nanochat); Llama has none
    norm_eps: float = 0.0  # RMSNorm epsilon; 0 = torch's default (the dtype's machine epsilon)
    embed_norm: bool = True  # RMS-normalise the embedding output (nanochat); Llama feeds it to the first block raw
    # lm_head shares the embedding matrix. A tied head cannot absorb the final norm's gain (the same matrix is the
    # input embedding), so tied models keep that gain as a parameter: final_norm_gain.
    tie_embeddings: bool = False
    final_norm_gain: bool = False  # a learned gain on the final RMSNorm before lm_head
    rope_convention: str = "nanochat"  # nanochat (pairs rotated by −θ) | llama (by +θ, transformers' rotate_half)

    def validate(self) -> "ModelConfig":
        if self.adapter not in ADAPTERS:
            raise UserError(f"unknown adapter {self.adapter!r} (choose from {', '.join(ADAPTERS)})")
        if self.adapter_init not in ADAPTER_INITS:
            raise UserError(f"unknown adapter init {self.adapter_init!r} (choose from {', '.join(ADAPTER_INITS)})")
        if self.state_init not in STATE_INITS:
            raise UserError(f"unknown state init {self.state_init!r} (choose from {', '.join(STATE_INITS)})")
        if self.r_max < 1:
            raise UserError(f"r_max must be >= 1, got {self.r_max}")
        if self.mean_recur < 1 or self.mean_recur > self.r_max:
            raise UserError(f"mean_recur must be in [1, r_max={self.r_max}], got {self.mean_recur}")
        for name in ("n_prelude", "n_shared", "n_coda"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_prelude + self.n_shared + self.n_coda == 0:
            raise UserError("the model has no blocks (n_prelude + n_shared + n_coda = 0)")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head or (self.d_model // self.n_head) % 2:
            raise UserError(f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}: "
                            "need d_model % n_head == 0, n_head % n_kv_head == 0 and an even head dim")
        if self.mlp not in MLP_KINDS:
            raise UserError(f"unknown mlp {self.mlp!r} (choose from {', '.join(MLP_KINDS)})")
        if self.rope_convention not in ROPE_CONVENTIONS:
            raise UserError(f"unknown rope convention {self.rope_convention!r} "
                            f"(choose from {', '.join(ROPE_CONVENTIONS)})")
        if self.mlp_hidden < 0 or self.norm_eps < 0:
            raise UserError(f"mlp_hidden and norm_eps must be >= 0, got {self.mlp_hidden}, {self.norm_eps}")
        if self.attn_window < 0:
            raise UserError(f"attn_window must be >= 0 (0 = full causal attention), got {self.attn_window}")
        if self.seq_len < 2:
            raise UserError(f"seq_len must be >= 2, got {self.seq_len}")
        return self

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: mlp_hidden, or mlp_ratio × d_model when it is 0."""
        return self.mlp_hidden or self.mlp_ratio * self.d_model

    @property
    def mlp_params(self) -> int:
        """Parameters of one block's MLP: c_fc (gate and up for swiglu) and c_proj."""
        return (3 if self.mlp == "swiglu" else 2) * self.d_model * self.mlp_width

    @property
    def recursive(self) -> bool:
        return self.n_shared > 0

    @property
    def effective_layers(self) -> int:
        """Blocks a token passes through at r = r̄: P + r̄·R + C."""
        return self.n_prelude + self.mean_recur * self.n_shared + self.n_coda

    def standard_twin(self) -> "ModelConfig":
        """The iso-FLOP standard model: P + r̄·R + C distinct blocks of the same width, no recurrence."""
        return dataclasses.replace(self, n_prelude=self.n_prelude + self.mean_recur * self.n_shared, n_shared=0,
                                   mean_recur=1, r_max=max(1, self.r_max))

    def iso_params_twin(self) -> "ModelConfig":
        """The iso-params standard model: the same P + R + C distinct blocks applied once (no adapter)."""
        return dataclasses.replace(self, n_prelude=self.n_prelude + self.n_shared, n_shared=0, mean_recur=1,
                                   r_max=max(1, self.r_max))

    def twin(self, kind: str) -> "ModelConfig":
        """The standard baseline named `kind` (TWINS)."""
        if kind not in TWINS:
            raise UserError(f"unknown standard baseline {kind!r} (choose from {', '.join(TWINS)})")
        return self.standard_twin() if kind == "iso-flops" else self.iso_params_twin()


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 200  # length of the LR schedule
    stop_after: int = 0  # stop this invocation after N steps (0 = run to max_steps); for preemptible jobs / tests
    batch_size: int = 8  # rows per micro-batch per rank
    total_batch_tokens: int = 2048  # global tokens per optimizer step; accumulation = this / (B·T·world)
    lr_matrix: float = 0.02  # Muon (2-D block and adapter weights)
    lr_embed: float = 0.05  # AdamW
    lr_head: float = 0.004  # AdamW
    lr_scalar: float = 0.01  # AdamW (any 1-D parameters)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.8, 0.95)
    warmup_steps: int = 10
    warmdown_frac: float = 0.3
    final_lr_frac: float = 0.0
    grad_clip: float = 1.0
    recur_dist: str = "poisson-lognormal"  # fixed[:R] | poisson-lognormal
    recur_sigma: float = 0.5
    curriculum_frac: float = 0.0  # ramp r̄ from 1 over this fraction of max_steps
    lr_shared_scale: float = 1.0  # multiplies lr_matrix for the shared blocks (they get r gradient contributions)
    bptt_k: int = 4  # gradient flows through the last k iterations only
    # Recipes that keep depth working on probes (docs/ablations/probes/): Bansal et al.'s progressive loss mixes in,
    # with weight α, the loss after n ~ U{0..r−1} no-grad iterations and k ~ U{1..r−n} with gradients; loss_reach ≥ 0
    # supervises only the probe labels r iterations can reach (difficulty ≤ r + loss_reach; −1 = every label).
    progressive_loss: float = 0.0
    loss_reach: int = -1
    # Hints (probes with intermediate targets, e.g. chase): the state after iteration i > hint_lag is also read out and
    # trained on step i − hint_lag of each answer's path; the mean of those losses is added with this weight
    # (model/recurrent.py: RecurrentLM.hint_readout). 0 = off.
    hint_weight: float = 0.0
    hint_lag: int = 1
    dtype: str = "auto"  # auto (bf16 where the device runs it natively, else fp32) | bf16 (autocast) | fp32
    eval_every: int = 50
    eval_tokens: int = 32768
    eval_recur: str = ""  # comma list; empty = 1, r̄, 2·r̄
    save_every: int = 0  # also checkpoint every N steps (0 = by time and at the end only)
    save_every_min: float = 5.0  # also checkpoint when this many minutes passed since the last save (0 = off)
    keep_checkpoints: int = 2  # the newest K of out/checkpoint/step-NNNNNN are kept
    log_every: int = 1
    compile: bool | None = None  # None = auto: on for CUDA (pays off), off for CPU (~30 s to compile, 1.1× faster)
    peak_flops: float = 0.0  # MFU denominator; 0 = measured on the model's matmuls (model/hardware.py)
    data: str = ""  # empty = embedded corpus; for sft: FILE.jsonl or builtin:TASK[,TASK…]
    pretrain_data: str = ""  # sft: the base model's pretraining text (empty = embedded), for plain-text val bpb
    mix_pretrain: float = 0.0  # sft: fraction of micro-batches that are windows of pretraining text (full loss)
    sft_examples: int = 2000  # builtin SFT tasks: training conversations per task
    stage: str = "pretrain"  # pretrain | sft (set by `recurchat sft`)
    wandb: str = ""  # project name; empty = off
    parallel: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2, sharded weights and optimizer state)

    def validate(self) -> "TrainConfig":
        if self.bptt_k < 1:
            raise UserError(f"bptt_k must be >= 1, got {self.bptt_k}")
        if self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.total_batch_tokens < 1:
            raise UserError("batch_size and total_batch_tokens must be >= 1")
        if self.save_every < 0 or self.save_every_min < 0:
            raise UserError(f"save_every and save_every_min must be >= 0, got {self.save_every}, {self.save_every_min}")
        if self.keep_checkpoints < 1:
            raise UserError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.lr_shared_scale <= 0:
            raise UserError(f"lr_shared_scale must be > 0, got {self.lr_shared_scale}")
        if not 0 <= self.mix_pretrain < 1 or (self.mix_pretrain and self.stage != "sft"):
            raise UserError(f"mix_pretrain must be in [0, 1) and is for sft only, got {self.mix_pretrain}")
        if not 0 <= self.progressive_loss < 1:
            raise UserError(f"progressive_loss must be in [0, 1), got {self.progressive_loss}")
        if not self.hint_weight >= 0 or self.hint_lag < 0:
            raise UserError(f"hint_weight and hint_lag must be >= 0, got {self.hint_weight}, {self.hint_lag}")
        if self.loss_reach < -1:
            raise UserError(f"loss_reach must be >= 0, or -1 for every label, got {self.loss_reach}")
        if not 0 <= self.curriculum_frac <= 1:
            raise UserError(f"curriculum_frac must be in [0, 1], got {self.curriculum_frac}")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r} ({' | '.join(DTYPES)})")
        if self.parallel not in PARALLEL_MODES:
            raise UserError(f"unknown parallel mode {self.parallel!r} ({' | '.join(PARALLEL_MODES)})")
        return self


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


def _preset(description: str, model: dict, train: dict) -> Preset:
    return Preset(ModelConfig(**model), TrainConfig(**train), description)


PRESETS: dict[str, Preset] = {
    # A few seconds: for tests and CI smoke runs.
    "cpu-smoke": _preset("seconds-long run for tests", dict(vocab_size=512, d_model=64, n_head=2, n_kv_head=1,
                         n_prelude=1, n_shared=1, n_coda=1, mean_recur=2, r_max=8, seq_len=64),
                         dict(max_steps=20, batch_size=4, total_batch_tokens=256, bptt_k=2, eval_every=10,
                              eval_tokens=2048, warmup_steps=2)),
    # Learns visibly in minutes on 2 CPU cores: 6 distinct blocks, 12 effective layers at r̄ = 4.
    "cpu-tiny": _preset("2-core CPU, minutes", dict(vocab_size=4096, d_model=256, n_head=4, n_kv_head=2,
                        n_prelude=2, n_shared=2, n_coda=2, mean_recur=4, r_max=16, seq_len=256),
                        dict(max_steps=200, batch_size=8, total_batch_tokens=2048, bptt_k=4)),
    # Labelled-sequence probes (data/tasks/probes.py): width 64, one block each for prelude, shared stack and coda,
    # and attention to the previous position only (attn_window = 2), so an answer t steps away needs about t
    # iterations: with full attention the model solves the trained lengths in 1-2 iterations by a shortcut that does
    # not extrapolate (docs/ablations/probes/). ~75 s per 2000 steps on 2 cores.
    "probe": _preset("depth probes on 2 CPU cores, minutes", dict(vocab_size=64, d_model=64, n_head=2, n_kv_head=2,
                     n_prelude=1, n_shared=1, n_coda=1, mean_recur=6, r_max=32, seq_len=128, attn_window=2),
                     dict(max_steps=2000, batch_size=64, total_batch_tokens=64 * 128, bptt_k=32, eval_every=500,
                          eval_tokens=256 * 256, eval_recur="1,6,24", warmup_steps=50, data="probe:parity:1-8",
                          loss_reach=2, save_every_min=0)),
    # The seed's setting: (P,R,C) = (2,4,2), r̄ = 4, r_max = 16, k = 4, d = 1280; iso-FLOP twin has 20 layers.
    "gpu-d20": _preset("8×H100-class, hours", dict(vocab_size=65536, d_model=1280, n_head=10, n_kv_head=10,
                       n_prelude=2, n_shared=4, n_coda=2, mean_recur=4, r_max=16, seq_len=2048),
                       dict(max_steps=20000, batch_size=16, total_batch_tokens=524288, bptt_k=4, warmup_steps=200,
                            eval_every=500, eval_tokens=10 * 524288, lr_embed=0.2, compile=True)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    p = PRESETS[name]
    return Preset(dataclasses.replace(p.model), dataclasses.replace(p.train), p.description)


def config_from_dict(cls, d: dict):
    """Build a dataclass from JSON, refusing unknown keys so a foreign config.json is caught early; fields saved
    under an old name (RENAMED_FIELDS) load under the new one."""
    if not isinstance(d, dict):
        raise UserError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    both = [old for old, new in RENAMED_FIELDS.items() if old in d and new in d]
    if both:
        raise UserError(f"{cls.__name__} has both {both[0]!r} and its new name {RENAMED_FIELDS[both[0]]!r}")
    d = {RENAMED_FIELDS.get(k, k): v for k, v in d.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    d = {**{k: v for k, v in ADDED_FIELDS.items() if k in names}, **d}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**d)
