"""Every file under conf/ composes and validates; a bad key or value fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bipe.errors import ConfigError
from tests.conftest import CONF, compose_train
from training.config import TrainConfig, model_config, plain, validate_config

GROUPS = ["pe", "model", "data", "task", "trainer", "logger", "callbacks", "paths", "experiment",
          "hparams_search"]
# data sources that need a key set to be valid at all
NEEDS = {("data", "text_files"): ["data.glob=/nowhere/*.txt"],
         ("data", "synthetic"): ["task=arithmetic"],  # the synthetic tasks' own data node
         # the run fills original_max_position from the checkpoint before validating
         ("experiment", "yarn_finetune"): ["init_from=base.ckpt",
                                           "pe.relative.scaling.original_max_position=46"],
         # SCROLLS fine-tunes a pretrained checkpoint
         ("task", "scrolls"): ["init_from=base.ckpt"],
         ("experiment", "scrolls"): ["init_from=base.ckpt"],
         ("experiment", "scrolls_sweep"): ["init_from=base.ckpt"],
         # a tuning grid belongs to its study
         ("hparams_search", "arithmetic_lr"): ["experiment=arithmetic_sweep"],
         ("hparams_search", "bi_nfa_lr"): ["experiment=bi_nfa_sweep"],
         ("hparams_search", "text_lr"): ["experiment=text_sweep"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_documented_options():
    assert set(options("pe")) == {"nope", "sinusoidal", "learned", "rope", "alibi", "bipe_rope",
                                  "bipe_alibi", "bipe_alibi_x1", "alibi_x16", "alibi_x11",
                                  "xpos", "rope_randomized", "learned_randomized", "t5",
                                  "bipe_t5", "kerple", "bipe_kerple", "fire", "bipe_fire"}
    assert {"tiny", "small", "base"} <= set(options("model"))
    assert {"shakespeare", "python_code", "pg19", "pile", "text_files"} <= set(options("data"))
    assert {"cpu", "gpu"} <= set(options("trainer"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))
    assert {"smoke", "example"} <= set(options("experiment"))


@pytest.mark.parametrize(("group", "option"),
                         [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", *NEEDS.get((group, option), [])], tmp_path)
    settings = validate_config(cfg)  # includes the model and PE config
    model = model_config(plain(cfg))
    assert settings.max_steps >= 1 and model.pe.name == cfg.pe.name
    if group == "pe":
        assert cfg.pe.name == option
    # Nothing is left unresolved or missing.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_eval_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=x.ckpt"])
    assert cfg.logger._target_.endswith("wandb_logger") and cfg.paths.cache_dir


def test_default_run_is_tiny_bipe_rope_on_shakespeare(tmp_path):
    cfg = compose_train([], tmp_path)
    choices_text = (cfg.pe.name, cfg.data.name, cfg.model.hidden_size, cfg.trainer.accelerator)
    assert choices_text == ("bipe_rope", "shakespeare", 128, "cpu")
    assert cfg.eval.lengths == [1, 2, 4, 8]
    assert cfg.logger._target_.endswith("wandb_logger")


def test_run_and_sweep_folders_are_unique_per_job():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["pe=alibi"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        run_dir = cfg.hydra.run.dir
        assert "/outputs/" in run_dir and run_dir.endswith("_alibi_tiny_shakespeare")
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        assert sweep["subdir"] == "${hydra.job.num}_${bipe.dirname:${hydra.job.override_dirname}}"
        assert "data.glob" in cfg.hydra.job.config.override_dirname.exclude_keys
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(("override", "key"), [
    ("+optim.lrr=0.1", "optim.lrr"),
    ("+trainer.max_step=5", "trainer.max_step"),
    ("+logger.projct=x", "logger.projct"),
    ("+callbacks.model_checkpoint.monitr=x", "callbacks.model_checkpoint.monitr"),
    ("+foo=1", "foo"),
    ("+eval.length=[1]", "eval.length"),
    ("+data.blocksize=64", "data.blocksize"),
    ("+model.hidden=64", "model.hidden"),
])
def test_unknown_key_fails_naming_it(override, key, tmp_path):
    assert key in config_error([override], tmp_path)


def config_error(overrides: list[str], tmp_path) -> str:
    """The one line a bad config gets: from Hydra when the schemas reject it at composition,
    else from `validate_config`."""
    from training.job import hydra_error_line

    try:
        cfg = compose_train(overrides, tmp_path)
    except (HydraException, OmegaConfBaseException) as exc:
        return hydra_error_line(exc)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


@pytest.mark.parametrize(("override", "stage"), [
    ("+optim.lrr=0.1", "composition"),  # typed nodes: the schema rejects the key
    ("+trainer.max_step=5", "validation"),  # `_target_` nodes: checked against the signature
])
def test_unknown_key_suggests_the_close_one_or_the_valid_ones(override, stage, tmp_path):
    message = config_error([override], tmp_path)
    key = override[1:].split("=")[0]
    assert "\n" not in message and key.rsplit(".", 1)[1] in message
    if stage == "validation":
        assert "did you mean 'max_steps'?" in message


@pytest.mark.parametrize(("override", "key"), [
    ("optim.schedule=exponential", "optim.schedule"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.warmup_steps=1.5", "optim.warmup_steps"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("trainer.accumulate_grad_batches=3", "trainer.val_check_interval"),
    ("trainer.check_val_every_n_epoch=1", "trainer.check_val_every_n_epoch"),
    ("eval.lengths=[1,0]", "eval.lengths"),
    ("task.name=translation", "task.name"),
    ("data.block_size=1", "data.block_size"),
    ("seed=abc", "seed"),
])
def test_bad_value_fails_naming_the_key(override, key, tmp_path):
    message = config_error([override], tmp_path)
    assert key in message and "\n" not in message


@pytest.mark.parametrize(("override", "key"), [
    ("model.hidden_size=100", "model.hidden_size"),  # head size 25: odd, RoPE needs pairs
    ("model.n_heads=3", "model.n_heads"),  # 128 is not divisible by 3
    ("pe.absolute.type=relative", "pe.absolute.type"),
])
def test_bad_model_shape_fails_validation(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(compose_train([override], tmp_path))


def test_both_ckpt_path_and_init_from_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path.*init_from"):
        validate_config(compose_train(["ckpt_path=a.ckpt", "init_from=b.ckpt"], tmp_path))


def test_unknown_group_choice_lists_the_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_train(["pe=bipe_rop"], tmp_path)
    assert "bipe_rope" in str(err.value) and "alibi" in str(err.value)


def test_override_of_a_missing_key_is_refused_by_hydra(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["optim.lrr=0.1"], tmp_path)
    assert "optim.lrr" in str(err.value)


def test_config_files_have_no_stray_keys():
    # Every top-level key of train.yaml is one the schema knows (so a typo there fails too).
    text = OmegaConf.load(Path(CONF) / "train.yaml")
    assert set(text) - {"defaults"} <= set(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize("search", options("hparams_search"))
def test_a_tuning_grid_composes_with_its_study_and_names_a_validation_metric(search):
    """`hparams_search=X` with its study: a grid over optim.lr for every encoding of the study,
    one seed, and an optimized_metric that is a validation metric (never a test one)."""
    study = NEEDS["hparams_search", search][0]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose(config_name="train", overrides=[study], return_hydra_config=True)
        cfg = compose(config_name="train", overrides=[study, f"hparams_search={search}"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert len(str(params["optim.lr"]).split(",")) >= 3
    assert params.pe == plain.hydra.sweeper.params.pe and str(params.seed) == "0"
    assert cfg.optimized_metric.startswith(("val/", "eval/"))
    assert not cfg.optimized_metric.startswith("test/")


@pytest.mark.parametrize("study", ["arithmetic_sweep", "bi_nfa_sweep", "text_sweep"])
def test_a_study_sweeps_three_seeds_of_each_encoding_with_its_tuned_lr(study, tmp_path):
    """Every encoding of a study composes, and takes its lr from conf/tuned/<study>/<pe>.yaml
    when that file exists (the command line still wins)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={study}"],
                      return_hydra_config=True)
    assert str(cfg.hydra.sweeper.params.seed).split(",") == ["0", "1", "2"]
    for pe in str(cfg.hydra.sweeper.params.pe).split(","):
        tuned = CONF / "tuned" / study / f"{pe}.yaml"
        job = compose_train([f"experiment={study}", f"pe={pe}"], tmp_path)
        validate_config(job)
        if tuned.is_file():
            assert job.optim.lr == OmegaConf.load(tuned).optim.lr
        assert compose_train([f"experiment={study}", f"pe={pe}", "optim.lr=0.123"]).optim.lr \
            == 0.123


def test_the_encoding_tour_runs_every_named_encoding(tmp_path):
    from bipe.config import NAMED_ENCODINGS

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=encoding_tour"],
                      return_hydra_config=True)
    pes = str(cfg.hydra.sweeper.params.pe).split(",")
    assert sorted(pes) == sorted(NAMED_ENCODINGS) and str(cfg.hydra.sweeper.params.seed) == "0"
    for pe in pes:
        job = compose_train(["experiment=encoding_tour", f"pe={pe}"], tmp_path)
        validate_config(job)
        assert job.study.name == "encoding_tour" and list(job.eval.lengths) == [1, 2, 4, 8, 16]


def test_sweep_job_folder_names_stay_short_and_unique():
    from training.config import short_dirname

    assert short_dirname("pe=rope,seed=1") == "pe=rope,seed=1"
    long_a = ",".join(f"task.key{i}={i}" for i in range(40))
    long_b = long_a.replace("key39=39", "key39=40")
    a, b = short_dirname(long_a), short_dirname(long_b)
    assert len(a) == len(b) == 120 and a != b and a.startswith("task.key0=0,")
    # A value with a path in it must not climb out of the sweep folder (or make a subfolder).
    for name in ("data.name=../../escaped", "tags=[a/b]", "x=.."):
        safe = short_dirname(name)
        assert "/" not in safe and ".." not in safe and safe != short_dirname(name + "1")



def test_slurm_launcher_composes_and_its_plugin_loads():
    """hydra/launcher=slurm: Hydra's submitit plugin builds its launcher (no cluster needed)."""
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.nodes) == ("gpu", 1)


INTERNAL_GROUPS = ("hydra", "schema", "tuned")  # picked by the code or an experiment, not typed


def help_groups(script: str) -> tuple[str, dict[str, list[str]]]:
    """`python <script> --help`: its text and its "Config groups" section as {group: options}."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("Config groups (group=option):") + 1
    end = lines.index("", start)
    groups = {}
    for line in lines[start:end]:
        group, _, options = line.partition(": ")
        groups[group] = options.split(", ")
    return out.stdout, groups


def test_train_help_lists_every_group_a_user_picks_with_its_options_and_no_internal_one():
    text, groups = help_groups("train.py")
    folders = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    assert {"pe", "logger", "experiment"} <= set(folders)
    expected = {f: options(f) for f in folders if f not in INTERNAL_GROUPS}
    assert {g: sorted(o) for g, o in groups.items()} == expected, \
        "conf/hydra/default.yaml's help lists other groups or options than conf/ holds"
    assert not any(g.startswith(f"{i}/") or g == i for g in groups for i in INTERNAL_GROUPS)
    assert "schema/" not in text and "tuned/" not in text
    assert len(text.splitlines()) < 40 and "python train.py task=arithmetic" in text


def test_eval_help_lists_only_the_groups_an_evaluation_reads():
    text, groups = help_groups("eval.py")
    defaults = OmegaConf.load(CONF / "eval.yaml").defaults
    read = sorted(next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d))
    assert read == ["logger", "paths"]
    assert {g: sorted(o) for g, o in groups.items()} == {g: options(g) for g in read}
    assert "pe" not in groups and "schema/" not in text and "tuned/" not in text
    assert len(text.splitlines()) < 40 and "python eval.py sweep_dir=" in text
