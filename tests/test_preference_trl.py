"""DPO and ORPO against TRL (a test dependency only): the same tiny model, adapter, token
sequences and β give the same losses, rewards and LoRA gradients, to 1e-5."""

import contextlib

import pytest
import torch
from peft import LoraConfig as PeftLora
from transformers import AutoModelForCausalLM

from lorakit import LoraModel
from lorakit.data.packing import collate
from lorakit.data.templates import Encoded
from lorakit.ops.attention import packed_positions, use_packed_attention
from lorakit.training.objective import Objective

datasets = pytest.importorskip("datasets")  # installed with trl (lorakit[test]); the import fails loudly below
trl = pytest.importorskip("trl")

ROWS = [{"prompt": [{"role": "user", "content": f"normalize the date March {d}"}],
         "chosen": [{"role": "assistant", "content": f"2021-03-{d:02d}"}],
         "rejected": [{"role": "assistant", "content": ["March", "the third of March", "Mar"][d % 3] + f" {d}, 2021"}]}
        for d in range(1, 6)]
BETA = 0.2


def _randomize_b(model, seed=3):
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)  # policy != reference from the first step


def _lorakit_twin(model_dir, trl_model, tmp_path) -> LoraModel:
    """A lorakit LoraModel over a fresh base with the TRL model's adapter (saved in PEFT's format)."""
    trl_model.save_pretrained(tmp_path / "adapter")
    return LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter",
                                     is_trainable=True)


def _pairs(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> list[Encoded]:
    """TRL's right-padded rows as lorakit pairs (chosen 2j, rejected 2j+1): each row up to its
    last scored token, labels where TRL scores one."""
    out = []
    for j in range(chosen_ids.shape[0]):
        for ids, mask in ((chosen_ids[j], chosen_mask[j]), (rejected_ids[j], rejected_mask[j])):
            n = int(mask.nonzero().max()) + 1
            out.append(Encoded(ids[:n].tolist(), torch.where(mask.bool(), ids, -100)[:n].tolist()))
    return out


def _lorakit_loss(lm, objective, pairs, pad_id, layout):
    """One micro-batch holding every pair, through the loop's own calls; loss.backward() done.
    layout: packed rows, padded rows, or one padding-free row (how the loop runs unpacked groups)."""
    packing = layout == "packed"
    item = [list(range(len(pairs)))] if packing else list(range(len(pairs)))
    batch = collate(item, pairs, packing, pad_id, padding_free=layout == "padding-free")
    per_document = layout != "padded"
    with use_packed_attention(lm.model) if per_document else contextlib.nullcontext(), packed_positions(batch.position_ids):
        loss, stats = objective.loss(lm, batch, objective.totals([batch]))
        loss.backward()
    return loss, stats


def _grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", "").removesuffix(".weight").split("base_model.model.")[-1]: p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("layout", ["packed", "padded", "padding-free"])
def test_dpo_loss_rewards_and_gradients_equal_trl(tiny_model_dir, tmp_path, layout):
    from trl import DPOConfig, DPOTrainer

    from conftest import build_tokenizer

    tok = build_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, per_device_train_batch_size=len(ROWS), report_to=[],
                     use_cpu=True, bf16=False, disable_dropout=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(ROWS),
                         peft_config=PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    _randomize_b(trainer.model)  # the reference is the base with the adapter off, as in lorakit
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    lm = _lorakit_twin(tiny_model_dir, trainer.model, tmp_path)
    n = len(ROWS)
    mask = batch["completion_mask"]
    pairs = _pairs(batch["input_ids"][:n], mask[:n], batch["input_ids"][n:], mask[n:])
    loss, stats = _lorakit_loss(lm, Objective("dpo", beta=BETA), pairs, tok.pad_token_id, layout)

    assert abs(float(loss) - float(trl_loss)) < 1e-5 and abs(float(loss) - 0.6931) > 1e-2  # not the trivial log 2
    assert stats["reward_margin"] / n == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert stats["reward_chosen"] / n == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert stats["logp_rejected"] / n == pytest.approx(metrics["logps/rejected"], abs=1e-4)
    assert 100 * metrics["rewards/accuracies"] == pytest.approx(stats["reward_acc"] / n * 100, abs=1e-6)
    ours, theirs = _grads(lm.model), _grads(trainer.model)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=1e-4), k
    assert max(g.abs().max() for g in ours.values()) > 1e-3  # gradients that mean something


def test_orpo_loss_and_gradients_equal_trl(tiny_model_dir, tmp_path):
    """ORPO: the odds-ratio term equals TRL's ORPOTrainer's; its NLL term covers the prompt tokens
    too, lorakit's the chosen answer only (the paper's L_SFT, as LLaMA-Factory) — so TRL's total
    is compared with its NLL taken over the answer tokens, from TRL's own logits."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from conftest import build_tokenizer

    tok = build_tokenizer()
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, per_device_train_batch_size=len(ROWS), report_to=[],
                      use_cpu=True, bf16=False, max_length=128, disable_dropout=True)
    trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(ROWS),
                          peft_config=PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    _randomize_b(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    c_logps, r_logps, c_logits, _, _ = trainer.concatenated_forward(trainer.model, batch)
    or_losses, *_ = trainer.odds_ratio_loss(c_logps, r_logps)
    labels = trainer.concatenated_inputs(batch, padding_value=tok.pad_token_id)["concatenated_labels"][:len(ROWS), 1:]
    answer_nll = torch.nn.functional.cross_entropy(c_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    trl_loss = answer_nll - or_losses.mean()
    trl_loss.backward()

    lm = _lorakit_twin(tiny_model_dir, trainer.model, tmp_path)
    c_mask, r_mask = batch["chosen_labels"] != -100, batch["rejected_labels"] != -100
    pairs = _pairs(batch["chosen_input_ids"], c_mask, batch["rejected_input_ids"], r_mask)
    loss, stats = _lorakit_loss(lm, Objective("orpo", beta=BETA), pairs, tok.pad_token_id, "packed")

    assert abs(float(loss) - float(trl_loss)) < 1e-5
    assert stats["nll"] / len(ROWS) == pytest.approx(float(answer_nll), abs=1e-5)
    ours, theirs = _grads(lm.model), _grads(trainer.model)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=1e-4), k
