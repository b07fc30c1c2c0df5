"""replay_kl: an SFTTrainer whose replay rows hold the model's whole next-token distribution in place.

TRL's SFT loss on a replay row (the base's own greedy answer) only pulls up the one token the base
picked at each position; everything else the LoRA moves is free to drift, and greedy answers to
other prompts change. Here a replay row instead costs the KL divergence from the base's
distribution (the same model with the adapter switched off) to the trained one, at each of its
answer tokens: the distillation term of "learning without forgetting". Correction rows keep the
cross-entropy on their answer tokens. The loss is the sum over the batch's answer tokens of either
term, per answer token (``kl_weight`` scales the replay term).

    >>> trainer = ReplayKLTrainer(model=…, args=SFTConfig(…), train_dataset=ds_with_replay_column,
    ...                           peft_config=LoraConfig(…), kl_weight=1.0)
"""

from __future__ import annotations

from trl import SFTTrainer

REPLAY_COLUMN = "replay"


class ReplayKLTrainer(SFTTrainer):
    """SFTTrainer + a per-row ``replay`` flag: cross-entropy on corrections, KL to the base on replay rows."""

    def __init__(self, *args, kl_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight
        inner = self.data_collator

        def collate(examples):
            import torch

            flags = torch.tensor([bool(e.get(REPLAY_COLUMN, False)) for e in examples])
            batch = inner([{k: v for k, v in e.items() if k != REPLAY_COLUMN} for e in examples])
            batch[REPLAY_COLUMN] = flags
            return batch

        self.data_collator = collate

    def _set_signature_columns_if_needed(self):
        # The Trainer drops dataset columns the model's forward does not take; keep the flag.
        super()._set_signature_columns_if_needed()
        if REPLAY_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, REPLAY_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch
        import torch.nn.functional as F

        replay = inputs[REPLAY_COLUMN]
        target = inputs["labels"][:, 1:]
        mask = target != -100
        lm = self.accelerator.unwrap_model(model).get_base_model()
        forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        # The vocabulary projection only at the answer tokens: full logits over a 49k vocabulary cost more
        # than the rest of a small model's step.
        hidden = lm.get_decoder()(**forward, use_cache=False).last_hidden_state[:, :-1][mask]
        logprobs = F.log_softmax(output_logits(lm, hidden), dim=-1)
        picked = logprobs.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
        is_replay = replay[:, None].expand_as(mask)[mask]
        total = -(picked * ~is_replay).sum()
        if is_replay.any():
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                rows = replay.nonzero().squeeze(-1)  # the base pass on the replay rows alone
                sub = {k: v[rows] for k, v in forward.items()}
                base_hidden = lm.get_decoder()(**sub, use_cache=False).last_hidden_state[:, :-1][mask[rows]]
                base_logprobs = F.log_softmax(output_logits(lm, base_hidden), dim=-1)
            # KL(base || trained) at each replay answer token
            kl = (base_logprobs.exp() * (base_logprobs - logprobs[is_replay])).sum(-1)
            total = total + self.kl_weight * kl.sum()
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        return (loss, None) if return_outputs else loss


def output_logits(lm, hidden):
    """The model's logits from its last hidden states (with the final soft-capping Gemma 2 and 3 apply)."""
    import torch

    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
