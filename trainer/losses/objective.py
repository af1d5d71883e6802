"""The actor's and the critic's step objective, composed from the registry (shared by backends).

A backend computes per-token logprobs (and entropy, critic values) for one micro-batch and
calls these objects; they return that micro-batch's share of the step's loss (aggregated with
step-wide denominators, so the shares of all micro-batches and ranks *sum* to the step's loss)
and its metrics. Resolved once from the AlgorithmConfig (`from_config`).

Actor loss per micro-batch:
    agg(w_t * policy_loss_t)            w = TIS weight (1 when TIS is off), 0 on tokens more
                                        than tis.max_token_lag versions old when that is set
  + kl.coef * agg(k(logp, ref))         when kl.coef > 0 and kl.mode == "loss"
  + agg(-entropy_coef * H_t)            when entropy_coef != 0
  + aux_coef * aux_loss * T_mb / T_step when the MoE aux loss is on
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from configs.algorithm import AlgorithmConfig
from trainer.backend import PackedBatch
from trainer.losses.aggregation import Aggregator
from trainer.losses.importance import (
    ISMode,
    mismatch_abs_diff,
    mismatch_k3,
    version_lag_keep,
)
from trainer.losses.kl import KLEstimator
from trainer.losses.mismatch import add_mismatch_splits
from trainer.losses.policy import ClipParams, PolicyInputs, PolicyLoss
from trainer.losses.registry import lookup
from trainer.losses.stats import StatSums
from trainer.losses.value import clipped_value_loss, entropy_bonus


@dataclass(frozen=True)
class StepTotals:
    """Step-wide denominators (summed over micro-batches and ranks).

    agg     the aggregation's count (tokens or sequences, see Aggregator.count)
    tokens  all tokens of the step (prompt included), for weighting the aux loss
    """

    agg: Tensor
    tokens: Tensor


@dataclass(frozen=True)
class ActorObjective:
    """The actor's loss, resolved once from an AlgorithmConfig."""

    policy_loss: PolicyLoss
    aggregator: Aggregator
    clip: ClipParams
    kl_loss: KLEstimator | None
    kl_metric: KLEstimator
    kl_coef: float
    importance: ISMode | None
    tis_low: float
    tis_high: float
    entropy_coef: float
    aux_coef: float
    is_sft: bool
    max_token_lag: int | None = None

    @classmethod
    def from_config(cls, algo: AlgorithmConfig, policy_loss: str | None = None) -> ActorObjective:
        """`policy_loss` overrides algo.policy_loss (e.g. "sft" in an SFT or RFT job)."""
        name = policy_loss or algo.policy_loss
        kl_estimator = lookup("kl", algo.kl.estimator)
        kl_as_loss = algo.kl.coef > 0 and algo.kl.mode == "loss"
        return cls(
            policy_loss=lookup("policy_loss", name),
            aggregator=lookup("loss_agg", algo.loss_agg),
            clip=ClipParams(algo.eps_clip_low, algo.eps_clip_high, algo.dual_clip),
            kl_loss=kl_estimator if kl_as_loss else None,
            kl_metric=kl_estimator,
            kl_coef=algo.kl.coef,
            importance=lookup("importance", algo.tis.mode) if algo.tis.enabled else None,
            tis_low=algo.tis.low,
            tis_high=algo.tis.high,
            entropy_coef=algo.entropy_coef,
            aux_coef=algo.moe.aux_loss_coef,
            is_sft=lookup("policy_loss", "sft") is lookup("policy_loss", name),
            max_token_lag=algo.tis.max_token_lag,
        )

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0

    @property
    def needs_ref(self) -> bool:
        return self.kl_coef > 0 and not self.is_sft

    def count(self, batch: PackedBatch) -> Tensor:
        """This micro-batch's share of StepTotals.agg."""
        return self.aggregator.count(batch.loss_mask, batch.seq_ids, batch.num_seqs)

    def __call__(
        self,
        batch: PackedBatch,
        logprobs: Tensor,
        totals: StepTotals,
        *,
        entropy: Tensor | None = None,
        aux_loss: Tensor | None = None,
    ) -> tuple[Tensor, StatSums]:
        """(loss share, metrics) of one micro-batch. logprobs, entropy: float32 [T]."""
        mask, stats = batch.loss_mask, StatSums()
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        inputs = PolicyInputs(logprobs, old, batch.advantages, mask, batch.seq_ids, batch.num_seqs)
        out = self.policy_loss(inputs, self.clip)
        per_token = out.loss
        if not self.is_sft:
            per_token = self._importance(per_token, batch, old, stats)
            self._policy_stats(stats, batch, logprobs, old, out.ratio, out.clipped)
        pg_loss = self._agg(per_token, batch, totals)
        stats.add_sum("pg_loss", pg_loss)
        loss = pg_loss
        loss = loss + self._kl(batch, logprobs, totals, stats)
        if entropy is not None:
            stats.add_masked_mean("entropy", entropy, mask)
            if self.needs_entropy:
                entropy_loss = self._agg(entropy_bonus(entropy, self.entropy_coef), batch, totals)
                stats.add_sum("entropy_loss", entropy_loss)
                loss = loss + entropy_loss
        if aux_loss is not None and self.aux_coef > 0:
            aux = self.aux_coef * aux_loss * (batch.num_tokens / totals.tokens)
            stats.add_sum("aux_loss", aux)
            loss = loss + aux
        stats.add_sum("loss", loss)
        return loss, stats

    def _agg(self, per_token: Tensor, batch: PackedBatch, totals: StepTotals) -> Tensor:
        return self.aggregator.reduce(
            per_token, batch.loss_mask, batch.seq_ids, batch.num_seqs, totals.agg
        )

    def _importance(
        self, per_token: Tensor, batch: PackedBatch, old: Tensor, stats: StatSums
    ) -> Tensor:
        mask, rollout = batch.loss_mask, batch.rollout_logprobs
        split = {"mismatch_abs_diff": mismatch_abs_diff(old, rollout)}
        split["mismatch_k3"] = mismatch_k3(old, rollout)
        stats.add_masked_means(split, mask)
        if self.importance is None:
            add_mismatch_splits(stats, batch, split, mask)
            return self._lag_mask(per_token, batch, stats)
        weights = self.importance(old, rollout, self.tis_low, self.tis_high)
        add_mismatch_splits(stats, batch, split | {"tis_clip_frac": weights.clipped}, mask)
        stats.add_masked_means(
            {"tis_weight": weights.weights, "tis_clip_frac": weights.clipped}, mask
        )
        stats.add_masked_extremes("tis_weight", weights.weights, mask)
        return self._lag_mask(per_token * weights.weights, batch, stats)

    def _lag_mask(self, per_token: Tensor, batch: PackedBatch, stats: StatSums) -> Tensor:
        """Zero the tokens older than max_token_lag versions (tis.max_token_lag)."""
        keep = version_lag_keep(batch.versions, batch.policy_version, self.max_token_lag)
        if keep is None:
            return per_token
        keep = keep.to(per_token.device)
        stats.add_masked_mean("token_lag_masked_frac", 1.0 - keep, batch.loss_mask)
        return per_token * keep

    def _policy_stats(
        self,
        stats: StatSums,
        batch: PackedBatch,
        logprobs: Tensor,
        old: Tensor,
        ratio: Tensor,
        clipped: Tensor,
    ) -> None:
        mask = batch.loss_mask
        means = {"clip_frac": clipped, "ppo_kl": old - logprobs.detach(), "ratio": ratio}
        stats.add_masked_means(means | {"advantages": batch.advantages}, mask)
        stats.add_masked_extremes("ratio", ratio, mask)

    def _kl(
        self, batch: PackedBatch, logprobs: Tensor, totals: StepTotals, stats: StatSums
    ) -> Tensor | float:
        if batch.ref_logprobs is None or self.is_sft:
            return 0.0
        stats.add_masked_mean(
            "kl", self.kl_metric(logprobs.detach(), batch.ref_logprobs), batch.loss_mask
        )
        if self.kl_loss is None:
            return 0.0
        kl_loss = self.kl_coef * self._agg(
            self.kl_loss(logprobs, batch.ref_logprobs), batch, totals
        )
        stats.add_sum("kl_loss", kl_loss)
        return kl_loss


@dataclass(frozen=True)
class CriticObjective:
    """vf_coef * agg(clipped value loss), aggregated like the actor's loss."""

    aggregator: Aggregator
    value_clip: float
    vf_coef: float

    @classmethod
    def from_config(cls, algo: AlgorithmConfig) -> CriticObjective:
        return cls(lookup("loss_agg", algo.loss_agg), algo.value_clip, algo.vf_coef)

    def count(self, batch: PackedBatch) -> Tensor:
        return self.aggregator.count(batch.loss_mask, batch.seq_ids, batch.num_seqs)

    def __call__(
        self, batch: PackedBatch, values: Tensor, totals: StepTotals
    ) -> tuple[Tensor, StatSums]:
        """(loss share, metrics); values float32 [T] (differentiable), aligned as the batch."""
        if batch.returns is None:
            raise ValueError("returns: the critic needs PackedBatch.returns (advantage 'gae')")
        old = batch.values if batch.values is not None else values.detach()
        out = clipped_value_loss(values, old, batch.returns, self.value_clip)
        mask = batch.loss_mask
        loss = self.vf_coef * self.aggregator.reduce(
            out.loss, mask, batch.seq_ids, batch.num_seqs, totals.agg
        )
        stats = StatSums()
        stats.add_sum("value_loss", loss)
        stats.add_masked_mean("value_clip_frac", out.clipped, mask)
        stats.add_masked_mean("values", values, mask)
        stats.add_masked_mean("returns", batch.returns, mask)
        return loss, stats
