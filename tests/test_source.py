"""Pins, sources and downloads: each bad input is a one-line error with its code."""

import hashlib
import io
import re
import tarfile

import pytest
from release_fixtures import RELEASE_FILES, REPOSITORY, VERSION, make_tarball, pin_text

from moepatch import gitutil, index
from moepatch.errors import ArchiveError, PinError, VerifyError
from moepatch.pin import load_pin, parse_pin
from moepatch.source import base_from_path, resolve_base, safe_extract


def test_pin_round_trip(project):
    pin = load_pin(project.pin)
    assert pin.version == VERSION and pin.matches_commit("gabcdef123")
    assert not pin.matches_commit("g0000000")


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda t: t.replace('version = "9.9.9"\n', ""), "'version'"),
        (lambda t: t.replace('commit = "abcdef123"', 'commit = "xyz"'), "'commit'"),
        (lambda t: t.replace("[sdist]", "[other]"), "'[sdist]'"),
        (lambda t: t.replace("sha256 = ", "sha256 = 12 #"), "'sdist.sha256'"),
        (lambda t: t + "version = \n", "not valid TOML"),
    ],
)
def test_malformed_pin_names_the_key(project, mutate, key, capsys):
    project.pin.write_text(mutate(project.pin.read_text()))
    with pytest.raises(PinError, match=re.escape(key)):
        load_pin(project.pin)
    assert project.run() == 3
    assert key in capsys.readouterr().err


def test_tarball_with_wrong_hash_is_refused(project, capsys):
    make_tarball(project.tarball, {**RELEASE_FILES, "vllm/extra.py": "x = 1\n"})
    assert project.run() == 5
    assert "sha256" in capsys.readouterr().err
    assert not project.target.exists()


def test_release_with_other_version_is_refused(project, tmp_path):
    files = {**RELEASE_FILES, "vllm/_version.py": "__version__ = version = '1.0.0'\n"}
    sha = make_tarball(project.tarball, files)
    pin = parse_pin(pin_text(sha), project.pin)
    with pytest.raises(VerifyError, match="version 1.0.0, the pin says 9.9.9"):
        base_from_path(project.tarball, pin)


def test_release_with_other_commit_is_refused(project):
    files = {
        **RELEASE_FILES,
        "vllm/_version.py": RELEASE_FILES["vllm/_version.py"].replace("gabcdef123", "g999999999"),
    }
    sha = make_tarball(project.tarball, files)
    pin = parse_pin(pin_text(sha), project.pin)
    with pytest.raises(VerifyError, match="commit g999999999"):
        base_from_path(project.tarball, pin)


def _evil_tarball(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("vllm-9.9.9/vllm/_version.py")
        text = RELEASE_FILES["vllm/_version.py"].encode()
        ok.size = len(text)
        tar.addfile(ok, io.BytesIO(text))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("vllm-9.9.9/../../escaped.txt"),
        tarfile.TarInfo("/tmp/absolute.txt"),
        pytest.param("link", id="symlink-escaping"),
    ],
)
def test_unsafe_tarball_is_refused(tmp_path, member):
    if member == "link":
        member = tarfile.TarInfo("vllm-9.9.9/vllm/evil")
        member.type = tarfile.SYMTYPE
        member.linkname = "/etc/passwd"
    archive = tmp_path / "evil.tar.gz"
    _evil_tarball(archive, member)
    with pytest.raises(ArchiveError, match="unsafe member"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_unsafe_tarball_through_cli_exits_11(project, capsys):
    member = tarfile.TarInfo("vllm-9.9.9/../escaped.txt")
    _evil_tarball(project.tarball, member)
    sha = hashlib.sha256(project.tarball.read_bytes()).hexdigest()
    project.pin.write_text(pin_text(sha))
    assert project.run() == 11
    assert "unsafe member refused" in capsys.readouterr().err


def _write_tree(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_extracted_tree_is_a_source(project, tmp_path, two_patches):
    tree = tmp_path / "tree"
    _write_tree(tree, RELEASE_FILES)
    project.set_series(two_patches)
    assert project.run("apply", "--source", str(tree)) == 0
    assert "return 2 * x" in (project.target / "vllm/gate.py").read_text()


def test_git_checkout_is_a_source_when_its_commit_matches(project, tmp_path, capsys):
    checkout = tmp_path / "checkout"
    _write_tree(checkout, RELEASE_FILES)
    gitutil.run(checkout, "init", "-q")
    gitutil.run(checkout, "add", "-A", "-f")
    gitutil.run(checkout, "commit", "-qm", "upstream", env=gitutil.env_for(("U", "u@x")))
    assert project.run("apply", "--source", str(checkout)) == 5
    assert "no commit matching the pin" in capsys.readouterr().err
    sha = gitutil.rev(checkout, "HEAD")
    project.pin.write_text(project.pin.read_text().replace("abcdef123", sha))
    assert project.run("apply", "--source", str(checkout)) == 0
    assert project.git("rev-parse", "vllm-base") == sha


def test_index_comes_from_pip_configuration(served_index, monkeypatch):
    assert index.index_urls()[0].startswith("http://127.0.0.1:")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///srv/a file:///srv/b")
    assert index.index_urls()[1:] == ["file:///srv/a", "file:///srv/b"]


@pytest.mark.parametrize("mode", ["json", "html"])
def test_sdist_from_index_is_downloaded_verified_and_cached(project, served_index, mode, capsys):
    served_index.mode = mode
    assert project.run("apply", "--source", "sdist") == 0
    assert "from sdist" in capsys.readouterr().out
    # A second tree from the cache needs no index at all.
    served_index.mode = "down"
    other = project.target.parent / "other"
    assert project.run("apply", "--source", "sdist", "--target", str(other)) == 0


def test_truncated_download_is_refused(project, served_index, capsys):
    served_index.mode = "truncate"
    assert project.run("apply", "--source", "sdist") == 12
    assert "truncated" in capsys.readouterr().err
    assert not list((project.root.parent / "cache").rglob("*.tar.gz"))


def test_tampered_download_is_refused(project, served_index, capsys):
    served_index.archive = served_index.archive + b"tampered"
    assert project.run("apply", "--source", "sdist") == 5
    assert "sha256" in capsys.readouterr().err


def test_network_down_is_a_one_line_error(project, monkeypatch, capsys):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert project.run("apply", "--source", "sdist") == 6
    err = capsys.readouterr().err
    assert err.startswith("error: cannot list vllm on the index") and err.count("\n") == 1


def test_auto_falls_back_to_sdist_when_git_is_unreachable(project, served_index, capsys):
    pin = load_pin(project.pin)
    base = resolve_base(pin, "auto")  # example.invalid never answers
    assert base.source == "sdist"


def _upstream_repo(tmp_path):
    """A stand-in for the GitHub repository: the release files, tagged."""
    repo = tmp_path / "upstream"
    _write_tree(repo, RELEASE_FILES)
    gitutil.run(repo, "init", "-q")
    gitutil.run(repo, "add", "-A", "-f")
    gitutil.run(repo, "commit", "-qm", "release", env=gitutil.env_for(("U", "u@x")))
    gitutil.run(repo, "tag", f"v{VERSION}")
    gitutil.run(repo, "commit", "-qm", "later", "--allow-empty", env=gitutil.env_for(("U", "u@x")))
    return repo, gitutil.rev(repo, f"v{VERSION}")


def _pin_git(project, repo, commit):
    text = project.pin.read_text().replace("abcdef123", commit)
    project.pin.write_text(text.replace(REPOSITORY, f"file://{repo}"))


@pytest.mark.parametrize("digits", [40, 9], ids=["full-sha", "short-sha-via-tag"])
def test_git_source_fetches_the_pinned_commit(project, tmp_path, digits):
    repo, sha = _upstream_repo(tmp_path)
    _pin_git(project, repo, sha[:digits])
    assert project.run("apply", "--source", "git") == 0
    assert project.git("rev-parse", "vllm-base") == sha
    # The fetch is shallow: only the pinned commit came over.
    assert project.git("rev-list", "--count", "vllm-base") == "1"
    # auto takes git when the repository answers.
    other = project.target.parent / "other"
    assert project.run("apply", "--target", str(other), "--source", "auto") == 0
    assert gitutil.rev(other, "vllm-base") == sha


def test_git_source_refuses_a_tag_at_another_commit(project, tmp_path, capsys):
    repo, sha = _upstream_repo(tmp_path)
    _pin_git(project, repo, "0123456789")
    assert project.run("apply", "--source", "git") == 5
    assert "the pin says 0123456789" in capsys.readouterr().err
    assert not project.target.exists()
