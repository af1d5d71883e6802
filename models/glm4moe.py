"""Glm4MoeForCausalLM: the GLM-4.5/4.6 MoE decoder with a training path over packed sequences
and an inference path over a KV cache, plus the MoE hooks RL needs.

Module paths equal transformers' in-memory names (model.embed_tokens, model.layers.{i}.
self_attn.q_proj, .mlp.gate, .mlp.experts.gate_up_proj, ..., model.norm, lm_head), so
`hf_state_dict` only has to split the fused experts into HF's per-expert on-disk names. The
MTP layers (models/mtp.py) live at `mtp.{i}` and are named `model.layers.{N + i}` on disk;
they run only in `forward_mtp` (the main paths, the KV cache and expert_load ignore them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models import moe
from models.attention import Attention
from models.batching import PackInfo, TreeLayout
from models.config import ModelConfig
from models.decode import DecodeWeights, cached_forward
from models.hf_io import iter_hf_tensors, load_hf_tensors
from models.kv_cache import KVCache
from models.layers import MLP, RMSNorm, Rope, RotaryEmbedding
from models.logprobs import chunked_token_logprobs
from models.moe import ExpertBank, MoE, RoutingCapture, RoutingReplay, TopkRouter
from models.mtp import MtpLayer, next_token_ids


@dataclass
class PackedOutput:
    hidden: Tensor  # [T, H] after the final norm, model dtype
    expert_load: Tensor  # float32 [n_moe, E]: choices routed to each expert in this forward
    aux_loss: Tensor  # float32 scalar: switch-style balance loss summed over MoE layers
    routed_experts: Tensor | None  # int64 [n_moe, T, k] used, under a RoutingCapture or Replay


@dataclass
class TokenLogprobs:
    logprobs: Tensor  # float32 [T]; 0.0 at the first token of every sequence
    entropy: Tensor | None  # float32 [T] with the same alignment, when asked
    expert_load: Tensor  # float32 [n_moe, E]
    aux_loss: Tensor  # float32 scalar
    routed_experts: Tensor | None  # int64 [n_moe, T, k] used, under a RoutingCapture or Replay


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.is_moe = layer_id >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward_packed(
        self,
        x: Tensor,
        rope: Rope,
        pack: PackInfo,
        forced: Tensor | None,
        moe_out: list,
        keep: Tensor | None = None,
    ) -> Tensor:
        """x [T, H] -> [T, H] ([M, H]: the rows `keep` int64 [M], whose MLP alone runs; the
        router still sees every row); appends the MoE layer's MoEOutput to moe_out."""
        x = x + self.self_attn.forward_packed(self.input_layernorm(x), rope, pack)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            if keep is not None:
                x, h = x.index_select(0, keep), h.index_select(0, keep)
            return x + self.mlp(h)
        out = self.mlp(h, forced, aux=True, rows=keep)
        moe_out.append(out)
        return (x if keep is None else x.index_select(0, keep)) + out.hidden


class Glm4MoeModel(nn.Module):
    """HF `model`: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # _weight skips nn.Embedding's own init (init_weights does it; slow on meta)
        embed = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embed)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rotary_dim, config.rope_theta)


class Glm4MoeForCausalLM(nn.Module):
    """The GLM-4.x MoE causal LM (see module docstring); fp32 on CPU by default."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MtpLayer(config.hidden_size, config.rms_norm_eps, DecoderLayer(config, layer_id))
            for layer_id in range(
                config.num_hidden_layers,
                config.num_hidden_layers + config.num_nextn_predict_layers,
            )
        )
        self.tie_weights()
        self.init_weights()
        self._decode: DecodeWeights | None = None  # cache of decode_weights()

    def tie_weights(self) -> None:
        """Share lm_head.weight with the input embedding when tie_word_embeddings (again after
        to_empty(), which unties parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's init: N(0, initializer_range) for matrices, ones for norms, zeros for biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding | TopkRouter):
                if module.weight.device.type != "meta":
                    module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, ExpertBank):
                if module.gate_up_proj.device.type != "meta":
                    module.gate_up_proj.normal_(0.0, std, generator=generator)
                    module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            if isinstance(module, TopkRouter):
                module.e_score_correction_bias.zero_()

    @torch.no_grad()
    def to_dtype(self, dtype: torch.dtype) -> Glm4MoeForCausalLM:
        """Cast parameters and float buffers to dtype in place. The router's
        e_score_correction_bias stays fp32 (as in HF) and FP8 weight buffers stay FP8."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        for module in self.modules():
            for name, buf in module.named_buffers(recurse=False):
                keep = buf.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv")
                if buf.is_floating_point() and not keep and name != "e_score_correction_bias":
                    setattr(module, name, buf.to(dtype))
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def moe_blocks(self) -> list[MoE]:
        """The MoE `mlp` of every MoE layer, in layer order (rows of expert_load)."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    # --- training path -----------------------------------------------------------------------
    def forward_packed(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        *,
        routing: RoutingCapture | RoutingReplay | None = None,
        layout: TreeLayout | None = None,
        keep: Tensor | None = None,
    ) -> PackedOutput:
        """input_ids int64 [T] holding B sequences at cu_seqlens int64 [B + 1] -> PackedOutput.

        Positions restart at 0 per sequence; attention never crosses a sequence boundary.
        With a `layout` (shared prompt trees) its rows, positions and tree mask are used
        instead of cu_seqlens, and expert_load counts each token as often as the sequences
        holding it (the numbers of the unshared pack). The aux loss is always computed over
        the computed tokens (a few [T, E] ops per MoE layer); use it or not.
        keep: int64 [M], the only rows of the output the caller reads (the training forward:
        the positions that predict trainable tokens). `hidden` is then [M, H], and the last
        layer's MLP runs on those rows only (nothing else reads the others); its router still
        sees every row, so expert_load, aux_loss and routing are those of the full pass.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected int64 [T], got shape {tuple(input_ids.shape)}")
        pack = PackInfo.build(cu_seqlens.to(input_ids.device), input_ids.numel(), layout)
        replay = routing.routed_experts if isinstance(routing, RoutingReplay) else None
        n_moe = len(self.config.moe_layer_ids)
        if replay is not None and tuple(replay.shape[:2]) != (n_moe, input_ids.numel()):
            raise ValueError(
                f"RoutingReplay.routed_experts: expected [{n_moe}, {input_ids.numel()}, k], "
                f"got {tuple(replay.shape)}"
            )
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(pack.positions, x.dtype)
        moe_out: list = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            forced = replay[len(moe_out)] if replay is not None and layer.is_moe else None
            x = layer.forward_packed(x, rope, pack, forced, moe_out, keep if i == last else None)
        hidden = self.model.norm(x)
        if moe_out and layout is not None:
            load = torch.stack(
                [moe.weighted_expert_load(o.experts, layout.multiplicity, o.load) for o in moe_out]
            )
            aux = torch.stack([o.aux_loss for o in moe_out]).sum()
        elif moe_out:
            load = torch.stack([o.load for o in moe_out])
            aux = torch.stack([o.aux_loss for o in moe_out]).sum()
        else:
            load = torch.zeros(0, self.config.n_routed_experts, device=x.device)
            aux = torch.zeros((), device=x.device)
        routed = None  # the experts used, under a replay too (R3 keeps them for training)
        if routing is not None and moe_out:
            routed = torch.stack([o.experts for o in moe_out])
        if isinstance(routing, RoutingCapture):
            routing.routed_experts = routed
        return PackedOutput(hidden, load, aux, routed)

    def token_logprobs(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        chunk_size: int = 1024,
        routing: RoutingCapture | RoutingReplay | None = None,
        layout: TreeLayout | None = None,
    ) -> TokenLogprobs:
        """logprobs[t] = log_softmax(logits[t-1] / temperature)[input_ids[t]], 0.0 at each
        sequence's first token; lm_head runs in chunks of chunk_size positions. With a
        `layout` the logits of token t are those at layout.predictor[t] (0.0 where -1)."""
        out = self.forward_packed(input_ids, cu_seqlens, routing=routing, layout=layout)
        if layout is not None:
            return self._predicted_logprobs(
                out, input_ids, layout, temperature, with_entropy, chunk_size
            )
        total = input_ids.numel()
        logp = torch.zeros(total, dtype=torch.float32, device=input_ids.device)
        entropy = torch.zeros_like(logp) if with_entropy else None
        if total > 1:
            lp, ent = chunked_token_logprobs(
                out.hidden[:-1],
                self.lm_head.weight,
                input_ids[1:],
                temperature=temperature,
                with_entropy=with_entropy,
                chunk_size=chunk_size,
            )
            starts = torch.zeros(total, dtype=torch.bool, device=input_ids.device)
            starts[cu_seqlens[:-1].to(input_ids.device)] = True
            zero = torch.zeros((), device=lp.device)
            logp = torch.where(starts[1:], zero, lp)
            logp = torch.cat([logp.new_zeros(1), logp])
            if with_entropy:
                entropy = torch.cat([zero[None], torch.where(starts[1:], zero, ent)])
        return TokenLogprobs(logp, entropy, out.expert_load, out.aux_loss, out.routed_experts)

    def _predicted_logprobs(
        self,
        out: PackedOutput,
        input_ids: Tensor,
        layout: TreeLayout,
        temperature: float,
        with_entropy: bool,
        chunk_size: int,
    ) -> TokenLogprobs:
        """token_logprobs of a tree layout: each token's logits at its predictor row."""
        predictor = layout.predictor.to(input_ids.device)
        targets = (predictor >= 0).nonzero().squeeze(1)
        lp, ent = chunked_token_logprobs(
            out.hidden[predictor[targets]],
            self.lm_head.weight,
            input_ids[targets],
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_size=chunk_size,
        )
        zeros = torch.zeros(input_ids.numel(), dtype=torch.float32, device=input_ids.device)
        logp = zeros.index_put((targets,), lp.float())
        entropy = zeros.index_put((targets,), ent.float()) if with_entropy else None
        return TokenLogprobs(logp, entropy, out.expert_load, out.aux_loss, out.routed_experts)

    def forward_mtp(self, input_ids: Tensor, cu_seqlens: Tensor, hidden: Tensor) -> list[Tensor]:
        """The MTP layers over a pack, given the main model's normed hidden [T, H] of it
        (PackedOutput.hidden). Returns one [T, H] per MTP layer k (normed; lm_head of row t
        predicts input_ids[t + k + 2]); rows whose target lies past their sequence are junk
        (use models.mtp.mtp_targets). Routing is the router's own (no capture, no replay)."""
        if not len(self.mtp):
            raise ValueError("forward_mtp: the model has no MTP layer (num_nextn_predict_layers=0)")
        pack = PackInfo.build(cu_seqlens.to(input_ids.device), input_ids.numel())
        outs: list[Tensor] = []
        ids = input_ids
        for layer in self.mtp:
            ids, _ = next_token_ids(ids, pack.cu_seqlens)
            hidden = layer.forward_packed(
                self.model.embed_tokens(ids), hidden, self.model.rotary_emb, pack, []
            )
            outs.append(hidden)
        return outs

    # --- inference path ----------------------------------------------------------------------
    def new_kv_cache(
        self, num_slots: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A zeroed cache of num_slots sequences of up to max_len tokens; dtype defaults to
        the model's (a different one, e.g. a bf16 cache for an fp32 model, is cast on the
        way in and out)."""
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"new_kv_cache: max_len={max_len} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        return KVCache.allocate(
            c.num_hidden_layers,
            num_slots,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            dtype or self.dtype,
            self.device,
        )

    @torch.inference_mode()
    def forward_cached(
        self,
        input_ids: Tensor,
        slots: Tensor | list[int],
        start_pos: Tensor | list[int],
        lengths: Tensor | list[int],
        cache: KVCache,
        *,
        all_logits: bool = False,
        routing: RoutingCapture | None = None,
        weights: DecodeWeights | None = None,
    ) -> Tensor:
        """Row i: lengths[i] new tokens (right-padded to L) continuing cache slot slots[i] at
        positions start_pos[i]..; returns float32 logits [B, V] at each row's last new token
        ([B, L, V] if all_logits). A RoutingCapture gets int64 [n_moe, B, L, k]. `weights`:
        run on these decode weights (the engine's, checked when something may have changed
        them) instead of decode_weights(). slots, start_pos and lengths: int64 [B] each, or
        host lists of B ints (the engine's rows: no tensors to build and read back)."""
        return cached_forward(
            self, input_ids, slots, start_pos, lengths, cache, all_logits, routing, weights
        )

    def decode_weights(self) -> DecodeWeights:
        """The fused inference views of the weights. When a weight changed in place (a weight
        update) its new values are copied into them (DecodeWeights.refresh, ~10x cheaper than a
        build); they are built anew when a tensor was replaced or reshaped."""
        key = DecodeWeights.key_of(self)
        decode = self._decode
        if decode is None or (decode.key != key and not decode.refresh(self, key)):
            self._decode = DecodeWeights.build(self, key)
        return self._decode

    # --- HF names ----------------------------------------------------------------------------
    def hf_state_dict(self) -> Iterator[tuple[str, Tensor]]:
        """(HF on-disk name, tensor) for every weight, as a GLM-4.5/4.6 checkpoint names them;
        FP8 layers yield `<x>.weight` (float8) and `<x>.weight_scale_inv`."""
        return iter_hf_tensors(self)

    def load_hf_state_dict(
        self,
        named: Iterable[tuple[str, Tensor]],
        strict: bool = True,
        *,
        fp8_block: tuple[int, int] | None = None,
    ) -> list[str]:
        """Load HF-named tensors in any order; strict=False allows a subset. Returns the
        names loaded. fp8_block: block size of incoming FP8 pairs (default 128x128)."""
        return load_hf_tensors(
            self,
            named,
            strict=strict,
            num_layers=self.config.num_hidden_layers,
            tied_lm_head=self.config.tie_word_embeddings,
            fp8_block=fp8_block,
        )
