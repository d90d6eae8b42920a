"""ExplaindTrainerCallback records transformers.Trainer runs: steps, θ_T, kernel, hooks, refusals."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.data import Dataset

# transformers (with accelerate, which its Trainer needs) is the optional extra
# `explaind[huggingface]`; without it there is nothing to test.
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers.training_args import ParallelMode  # noqa: E402

import explaind_kernel as ek  # noqa: E402
import explaind_trace as et  # noqa: E402
from integrations.errors import CallbackStateError, UnsupportedSetupError  # noqa: E402
from integrations.huggingface import ExplaindTrainerCallback, check_training_args  # noqa: E402

from .support import assert_final_is_model, assert_released, hook_count  # noqa: E402

VOCAB, LEN, N, BATCH = 50, 6, 32, 4
# see test_lightning.py: rounding-level completeness, with room for the sum over steps
COMPLETENESS_RTOL = 1e-4


class TokenData(Dataset):
    """Random token sequences with a binary label (or the tokens themselves for an LM)."""

    def __init__(self, n: int = N, seed: int = 0, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, LEN), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.lm = lm

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.x[i],
            "attention_mask": torch.ones(LEN, dtype=torch.long),
            "labels": self.x[i] if self.lm else self.y[i],
        }


def _bert(seed: int = 0):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(cfg)


def _args(tmp_path, **kw):
    opts = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    opts.update(kw)
    return transformers.TrainingArguments(**opts)


class FailingTrainer(transformers.Trainer):
    """Raises in the third training_step (the first micro-batch of the second step)."""

    def training_step(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise RuntimeError("boom at training_step")
        return super().training_step(*args, **kwargs)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """BERT classifier, 2 micro-batches per optimizer step, default linear LR schedule."""
    tmp = tmp_path_factory.mktemp("hf")
    model = _bert()
    path = str(tmp / "bert.lmdb")
    cb = ExplaindTrainerCallback(path, output="classifier", checkpoint_every=2)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp), train_dataset=TokenData(), callbacks=[cb]
    )
    with cb:
        trainer.train()
    return model, trainer, cb, path


def test_train_writes_one_trace_step_per_optimizer_step(bert_run) -> None:
    model, trainer, cb, path = bert_run
    assert not cb.recording
    with et.open_trace(path) as trace:
        assert trace.num_steps == trainer.state.global_step == 3
        assert trace.finished and trace.error is None
        assert trace.meta.output_module == "classifier"
        assert [len(trace.step(t).forwards) for t in range(3)] == [2, 2, 2]
        # the Trainer calls model(**inputs): keyword tensors with a batch dim are per sample
        fwd = trace.step(0).forwards[0]
        assert fwd.args == () and fwd.kwargs["input_ids"].shape == (BATCH, LEN)
        assert fwd.kwargs["labels"].shape == (BATCH,)
        assert fwd.cotangent.shape == (BATCH, 2)
        # the linear schedule, read from the param groups at each step
        lrs = [trace.step(t).groups[0]["lr"] for t in range(3)]
        assert lrs[0] > lrs[1] > lrs[2] > 0
        assert_final_is_model(trace, model)
        assert all(v == 0.0 for v in trace.check_drift().checkpoints.values())


def test_kernel_on_trainer_trace_is_complete(bert_run) -> None:
    _, _, _, path = bert_run
    fresh = _bert(seed=1)
    data = TokenData(n=4, seed=7)
    # the Trainer calls model(**batch): test inputs are keyword inputs too (labels left out)
    x_test = {"input_ids": data.x, "attention_mask": torch.ones_like(data.x)}
    result = ek.compute_kernel(path, fresh, x_test, outputs="predicted", progress=False)
    assert result.completeness()[1] <= COMPLETENESS_RTOL


def test_hooks_removed_after_train(bert_run) -> None:
    model, trainer, _, _ = bert_run
    assert_released(model, trainer.optimizer.optimizer)


def test_hooks_removed_after_train_that_raises(tmp_path) -> None:
    model = _bert()
    path = str(tmp_path / "t.lmdb")
    cb = ExplaindTrainerCallback(path, output="classifier")
    trainer = FailingTrainer(
        model=model, args=_args(tmp_path), train_dataset=TokenData(), callbacks=[cb]
    )
    with pytest.raises(RuntimeError, match="boom at training_step"), cb:
        trainer.train()
    with et.open_trace(path) as trace:
        assert trace.num_steps == 1 and not trace.finished
        assert "boom at training_step" in trace.error
    assert_released(model, trainer.optimizer.optimizer)


def test_loss_output_without_output_name_is_explained(tmp_path) -> None:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    cb = ExplaindTrainerCallback(str(tmp_path / "t.lmdb"))
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=TokenData(lm=True), callbacks=[cb]
    )
    with pytest.raises(CallbackStateError, match=r"'loss' is a scalar.*output='lm_head'"):
        trainer.train()  # closed by the callback itself, no `with` needed
    assert hook_count(model, trainer.optimizer.optimizer) == 0


def test_unsupported_optimizer_is_refused_at_train_begin(tmp_path) -> None:
    model = _bert()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    cb = ExplaindTrainerCallback(str(tmp_path / "t.lmdb"), output="classifier")
    trainer = FailingTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=TokenData(),
        callbacks=[cb],
        optimizers=(opt, None),
    )
    with pytest.raises(et.UnsupportedOptimizerError, match="RMSprop is not supported"), cb:
        trainer.train()
    assert getattr(trainer, "calls", 0) == 0  # refused before the first training_step
    assert hook_count(model, opt) == 0


@pytest.mark.parametrize(
    "setup, match",
    [
        ({"parallel_mode": ParallelMode.DISTRIBUTED, "world_size": 2}, "separate feature"),
        ({"parallel_mode": ParallelMode.NOT_DISTRIBUTED}, "multi-GPU"),
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
        ({"fsdp": ["full_shard"]}, "FSDP"),
        ({"torch_compile": True}, "torch_compile"),
        ({"load_best_model_at_end": True}, "load_best_model_at_end"),
    ],
)
def test_unsupported_training_args_are_refused(setup: dict, match: str) -> None:
    # distributed TrainingArguments cannot be built in one CPU process, so the check runs on
    # a stand-in with the attributes it reads (the callback calls it at on_train_begin)
    base = {"parallel_mode": ParallelMode.NOT_PARALLEL, "world_size": 1}
    args = types.SimpleNamespace(**{**base, **setup})
    with pytest.raises(UnsupportedSetupError, match=match):
        check_training_args(args)


def test_supported_training_args_pass(tmp_path) -> None:
    check_training_args(_args(tmp_path))


def test_callback_records_one_run_only(bert_run, tmp_path) -> None:
    model, _, cb, _ = bert_run
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=TokenData(), callbacks=[cb]
    )
    with pytest.raises(CallbackStateError, match="already recorded a run"), cb:
        trainer.train()


def test_recompute_mode_under_the_trainer(tmp_path, caplog) -> None:
    """gradients='recompute' through the callback (loss inside the model, output=, dropout,
    2 micro-batches per step): replay with the model rebuilds θ bit for bit; the Trainer's
    default clipping is named at the start."""
    path = str(tmp_path / "r.lmdb")
    cb = ExplaindTrainerCallback(
        path, output="classifier", checkpoint_every=2, gradients="recompute"
    )
    trainer = transformers.Trainer(
        model=_bert(),
        args=_args(tmp_path, max_grad_norm=0.0),
        train_dataset=TokenData(),
        callbacks=[cb],
    )
    with cb:
        trainer.train()
    with et.open_trace(path) as trace:
        assert trace.needs_model and trace.step(0).grads == {}
        drift = trace.check_drift(model=_bert(seed=1))
        assert drift.exact and set(drift.checkpoints) == {2, 3}
    cb = ExplaindTrainerCallback(
        str(tmp_path / "c.lmdb"), output="classifier", gradients="recompute"
    )
    trainer = transformers.Trainer(
        model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=TokenData(), callbacks=[cb]
    )
    with caplog.at_level("WARNING"), cb:
        trainer.train()
    assert "max_grad_norm=1.0 clips gradients" in caplog.text
