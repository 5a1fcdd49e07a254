"""Edge cases of resuming and configuring a run that the main trainer tests do not reach."""

from hybrid_lm.training import Trainer, load_train_config, train


def test_resume_applies_the_configs_optimizer_settings_not_the_checkpoints(write_config):
    path = write_config("resume_optim", sample_tokens=0, eval_batches=0)
    train(load_train_config(path), max_steps=2)
    changed = load_train_config(path, ["optim.weight_decay=0.0", "optim.betas=[0.5, 0.6]", "optim.eps=1e-3"])
    trainer = Trainer(changed, resume=True)
    assert trainer.step == 2
    for group in trainer.optimizer.param_groups:  # a --set on resume is not silently overruled by the checkpoint
        assert group["weight_decay"] == 0.0 and tuple(group["betas"]) == (0.5, 0.6) and group["eps"] == 1e-3
    assert trainer.optimizer.state  # while the Adam moments do carry over
