"""One error policy for the CLI: a user's mistake is one line on stderr and exit status 2; a bug
in our code is a traceback, never dressed as a user error."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from small_runs import BASE

import engram.cli
from engram.assembly import pick_device
from engram.checkpoint import write_manifest
from engram.cli import main
from engram.files import FolderLock

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "tiny.toml")
FAST = ["steps=1", "eval_every=1", "eval_tokens=256", "progress=false"]
UNWRITABLE = "/proc/engram-no-such/dir"  # /proc takes no new folders, even for root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def user_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process; it must exit 2 with one line on stderr naming `needles`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# ---- configs: recipes and key=value overrides -------------------------------------------------
@pytest.mark.parametrize(
    "toml, needle",
    [
        ("steps = [1, 2]", "steps=[1, 2] is not a valid int"),
        ("steps = true", "steps=True is not a valid int"),
        ("progress = 5", "progress=5 is not a valid bool"),
        ("tokenizer = 512", "tokenizer=512 is not a valid str"),
        ("data = ['a', 'b']", "data=['a', 'b'] is not a valid str"),
        ("[optim]\nlr = [1]", "optim.lr=[1] is not a valid float"),
        ("[optim]\nlr = nan", "optim.lr=nan is not a valid float"),
        ("[model.engram.spec]\nlayer_ids = 1", "layer_ids=1 is not a valid list"),
    ],
)
def test_recipe_value_of_the_wrong_type(capsys, tmp_path, toml, needle):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'preset = "tiny"\nout_dir = "{tmp_path / "run"}"\n{toml}\n')
    fast = [o for o in FAST if o.split("=")[0] not in toml]  # overrides would beat the recipe
    user_error(capsys, ["train", "--recipe", str(recipe), *fast], needle)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("steps=1e400", "steps='1e400' is not a valid int"),
        ("steps=nan", "steps='nan' is not a valid int"),
        ("steps=true", "steps='true' is not a valid int"),
        ("progress=7", "progress='7' is not a valid bool"),
        ("optim.lr=inf", "optim.lr='inf' is not a valid float"),
        ("optim.lr=1e999", "optim.lr='1e999' is not a valid float"),
    ],
)
def test_train_override_of_the_wrong_type(capsys, tmp_path, override, needle):
    argv = ["train", "--recipe", TINY, *FAST, f"out_dir={tmp_path / 'run'}", override]
    user_error(capsys, argv, needle)


def test_spec_override_overflow(capsys):
    user_error(capsys, ["spec", "--preset", "tiny", "--set", "seed=1e400"], "seed='1e400'")


# ---- output folders -------------------------------------------------------------------------
def test_train_into_an_unwritable_out_dir(capsys):
    argv = ["train", "--recipe", TINY, *FAST, f"out_dir={UNWRITABLE}"]
    user_error(capsys, argv, f"cannot write to {UNWRITABLE}")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--quick", "--out", UNWRITABLE],
        ["quantize", "--ckpt", "nowhere", "--kind", "int8", "--out", f"{UNWRITABLE}/q"],
        ["study", "collisions", "--quick", "--out", UNWRITABLE],
        ["study", "allocation", "--quick", "--out", UNWRITABLE],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_unwritable_out_folder(capsys, argv):
    user_error(capsys, argv, f"cannot write to {UNWRITABLE}")


# ---- devices --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["banana", "cuda", "cuda:99"])
def test_train_on_a_device_this_machine_lacks(capsys, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = ["train", "--recipe", TINY, *FAST, f"out_dir={tmp_path / 'run'}", f"device={device}"]
    user_error(capsys, argv, f"device {device!r}")


def test_pick_device_names_what_it_accepts():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda, cuda:N or mps"):
        pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


# ---- damaged checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(stdlib_corpus, tmp_path_factory) -> list[str]:
    """A 2-step run's overrides (resume them with --resume); the run is copied per test."""
    corpus = stdlib_corpus(80)
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = [f"data={corpus}", f"out_dir={out}", *BASE, "steps=2", "eval_every=2"]
    assert main(["train", *argv]) == 0
    return argv


def copy_run(trained: list[str], tmp_path: Path) -> tuple[Path, list[str]]:
    """A fresh copy of the trained run, and the overrides that resume it."""
    source = Path(trained[1].removeprefix("out_dir="))
    run = tmp_path / "run"
    shutil.copytree(source, run)
    argv = [trained[0], f"out_dir={run}", *trained[2:]]
    return run, [a.replace("steps=2", "steps=4") for a in argv]


def step_folder(run: Path) -> Path:
    (folder,) = sorted((run / "checkpoints").glob("step-*"))
    return folder


@pytest.mark.parametrize("name", ["optim.safetensors", "model.safetensors"])
def test_resume_from_a_truncated_checkpoint(capsys, trained, tmp_path, name):
    run, argv = copy_run(trained, tmp_path)
    path = step_folder(run) / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    user_error(capsys, ["train", "--resume", *argv], f"{name} has", "truncated")


@pytest.mark.parametrize(
    "placement",
    [[], ["tables.placement=host"], ["tables.placement=disk", "tables.cache_rows=2048"]],
)
def test_a_flipped_bit_in_any_checkpoint_file_is_refused(
    capsys, stdlib_corpus, tmp_path, placement
):
    """Every file a checkpoint holds (weights, optimiser state, table files: a packed disk table,
    an in-memory table's records) is checked against the SHA-256 its manifest recorded."""
    run = tmp_path / "run"
    argv = [f"data={stdlib_corpus(80)}", f"out_dir={run}", *BASE, "steps=2", *placement]
    assert main(["train", *argv]) == 0
    ckpt = step_folder(run)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert any(p.parent.name == "tables" for p in files) == bool(placement)
    for path in files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10  # one bit, in the middle of the file
        path.write_bytes(bytes(data))
        rel = path.relative_to(ckpt).as_posix()
        capsys.readouterr()
        user_error(capsys, ["eval", "--ckpt", str(run)], f"{rel} is damaged")
        user_error(capsys, ["train", "--resume", *argv], f"{rel} is damaged")
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    assert main(["eval", "--ckpt", str(run)]) == 0  # restored: loads again


def _summary(argv: list[str]) -> dict:
    """What a CLI command that succeeds prints last (its JSON summary)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0, argv
    return json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def disk_run(stdlib_corpus, tmp_path_factory) -> tuple[Path, list[str], float, float]:
    """A 4-step run with a disk table and checkpoints at steps 2 and 4; the overrides that
    resume it to step 6; the validation losses of `eval` and of that resume, undamaged."""
    out = tmp_path_factory.mktemp("disk_run") / "run"
    argv = [f"data={stdlib_corpus(80)}", f"out_dir={out}", *BASE, "steps=4", "ckpt_every=2"]
    argv += ["eval_every=2", "eval_tokens=512", "tables.placement=disk"]
    assert main(["train", *argv]) == 0
    copy = out.with_name("copy")
    shutil.copytree(out, copy)
    resume = [a.replace("steps=4", "steps=6").replace(str(out), str(copy)) for a in argv]
    evaluated = _summary(["eval", "--ckpt", str(copy)])["val_loss"]
    resumed = _summary(["train", "--resume", *resume])["val_loss"]
    shutil.rmtree(copy)
    return out, [a.replace("steps=4", "steps=6") for a in argv], evaluated, resumed


def _damage(path: Path, how: str) -> None:
    """Cut the file in half, or flip one bit of a digit past its middle: damage that still
    parses (a number in a JSON file takes another value)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        at = next(i for i in range(len(data) // 2, len(data)) if 0x30 <= data[i] <= 0x39)
        data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize(
    "rel, refused_by_resume, refused_by_eval",
    [
        ("checkpoints/latest", "latest names", "latest names"),
        ("checkpoints/step-0000004/manifest.json", "manifest.json is", "manifest.json is"),
        ("tokenizer.json", None, "tokenizer.json"),  # a resume rebuilds it from the recipe
        ("tables/layer1.table", None, None),  # live rows: a resume restores the checkpoint's
        ("config.json", None, None),  # written for people; recipes and manifests are read
        ("spec.json", None, None),
        ("metrics.jsonl", None, None),
    ],
)
def test_damage_to_any_file_of_a_run_folder_is_refused_or_harmless(
    capsys, disk_run, tmp_path, how, rel, refused_by_resume, refused_by_eval
):
    """The files outside the checkpoint's digests (those inside: the test above). Damage is
    either refused, naming the file and changing nothing in the checkpoints, or it is of a
    file the command does not read: then its result is exactly the undamaged one."""
    source, resume, evaluated, resumed = disk_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    _damage(run / rel, how)
    argv = [a.replace(str(source), str(run)) for a in resume]
    for command, refused, expected in [
        (["eval", "--ckpt", str(run)], refused_by_eval, evaluated),
        (["train", "--resume", *argv], refused_by_resume, resumed),
    ]:
        before = _digests(run / "checkpoints")
        if refused:
            capsys.readouterr()
            user_error(capsys, command, refused)
            assert _digests(run / "checkpoints") == before  # nothing lost
        else:
            assert _summary(command)["val_loss"] == expected


def test_a_manifest_naming_files_outside_its_folder_is_refused(capsys, trained, tmp_path):
    run, argv = copy_run(trained, tmp_path)
    manifest = step_folder(run) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    write_manifest(manifest.parent, data)  # with a valid digest: crafted, not damaged
    capsys.readouterr()
    user_error(capsys, ["train", "--resume", *argv], "outside its folder")


def test_manifest_without_tokenizer_fingerprint(capsys, trained, tmp_path):
    run, argv = copy_run(trained, tmp_path)
    manifest = step_folder(run) / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["tokenizer_fingerprint"]
    write_manifest(manifest.parent, data)
    capsys.readouterr()
    user_error(capsys, ["train", "--resume", *argv], "without tokenizer_fingerprint")
    user_error(capsys, ["eval", "--ckpt", str(run)], "without tokenizer_fingerprint")


def test_manifest_that_is_not_an_object(capsys, trained, tmp_path):
    run, _ = copy_run(trained, tmp_path)
    (step_folder(run) / "manifest.json").write_text("[1, 2]")
    capsys.readouterr()
    user_error(capsys, ["eval", "--ckpt", str(run)], "not a JSON object")


def test_training_into_a_folder_holding_a_run(capsys, trained, tmp_path):
    """Without --resume the new run's metrics would mix with the old: refused, and nothing of
    the old run is touched; --overwrite replaces it."""
    run, argv = copy_run(trained, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    user_error(capsys, ["train", *argv], "already holds a run", "--overwrite")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "metrics.jsonl").read_text() == metrics
    assert main(["train", "--overwrite", *argv]) == 0
    assert not (run / "metrics.jsonl").read_text().startswith(metrics)  # one run's metrics


def test_a_second_trainer_on_a_folder_in_use(capsys, trained, tmp_path):
    run, argv = copy_run(trained, tmp_path)
    holder = FolderLock(run)  # as a trainer still running in that folder holds it
    metrics = (run / "metrics.jsonl").read_text()
    try:
        capsys.readouterr()
        user_error(
            capsys, ["train", *argv, "--resume"], "in use by another run", f"pid {os.getpid()}"
        )
    finally:
        holder.release()
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing written


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK=3 must be in"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ],
)
def test_a_broken_torchrun_environment(capsys, tmp_path, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--recipe", TINY, *FAST, f"out_dir={tmp_path / 'run'}"]
    user_error(capsys, argv, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_on_an_unknown_device(capsys, trained, tmp_path):
    run, _ = copy_run(trained, tmp_path)
    capsys.readouterr()
    user_error(capsys, ["eval", "--ckpt", str(run), "--device", "banana"], "unknown device")


# ---- bugs stay bugs ---------------------------------------------------------------------------
@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError, AssertionError])
def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch, error):
    def broken(args):
        raise error("a bug in engram")

    monkeypatch.setattr(engram.cli, "cmd_spec", broken)
    with pytest.raises(error, match="a bug in engram"):
        main(["spec", "--preset", "tiny"])


def test_a_multi_line_user_error_is_one_line(capsys, monkeypatch):
    def wordy(args):
        raise ValueError("first line\n\tsecond line\n")

    monkeypatch.setattr(engram.cli, "cmd_spec", wordy)
    err = user_error(capsys, ["spec", "--preset", "tiny"], "first line; second line")
    assert err.startswith("engram spec: error:")


@pytest.mark.parametrize(
    "key, value, message",
    [
        (("model", "d_model"), 1 << 20, "GB of weights, its model.safetensors holds"),
        (("model", "engram", "spec", "base_sizes"), [10**12, 10**12], "GB in memory, more than"),
    ],
)
def test_a_hostile_config_is_refused_before_anything_is_allocated(
    capsys, trained, tmp_path, key, value, message
):
    """A checkpoint one was sent whose config would build terabytes: refused from its numbers."""
    run, _ = copy_run(trained, tmp_path)
    manifest = step_folder(run) / "manifest.json"
    data = json.loads(manifest.read_text())
    node = data["config"]
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    write_manifest(manifest.parent, data)
    capsys.readouterr()
    user_error(capsys, ["eval", "--ckpt", str(run)], message)
