"""paddlefsl says which extra installs a missing dependency, and checks the Paddle version it was tested with."""
import os
import subprocess
import sys
import warnings

import pytest

from paddlefsl.dependencies import TESTED_PADDLE, check_paddle_version, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_without_paddle_the_import_names_the_extras():
    run = _run("import sys; sys.modules['paddle'] = None\nfrom paddlefsl.metaopt.maml import MAML")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: paddlefsl needs PaddlePaddle, which is not installed")
    assert 'pip install "paddlefsl[cpu]"' in last and 'pip install "paddlefsl[gpu]"' in last


@pytest.mark.parametrize("version", ["2.6.1", "1.8.5"])
def test_an_older_paddle_is_refused(version):
    with pytest.raises(ImportError, match=rf"needs PaddlePaddle >=3.0,<4, found {version}; upgrade"):
        check_paddle_version(version)


@pytest.mark.parametrize("version", ["4.0.0", "5.1.0rc1", "0.0.0", "develop"])
def test_a_newer_or_unknown_paddle_warns(version):
    with pytest.warns(UserWarning, match=r"paddlefsl is tested with PaddlePaddle >=3.0,<4"):
        check_paddle_version(version)


@pytest.mark.parametrize("version", ["3.0.0", "3.3.1", "3.9.0.post1"])
def test_a_tested_paddle_passes_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_paddle_version(version)


def test_the_installed_paddle_is_in_the_tested_range():
    import paddle

    major_minor = tuple(int(p) for p in paddle.__version__.split(".")[:2])
    assert TESTED_PADDLE[0] <= major_minor < TESTED_PADDLE[1]


def test_setup_pins_the_same_range_and_keeps_matplotlib_optional():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    low, high = TESTED_PADDLE
    assert f'PADDLE = ">={low[0]}.{low[1]},<{high[0]}"' in setup
    requires = setup.split("install_requires=")[1].split("]")[0]
    assert "matplotlib" not in requires and "paddle" not in requires
    assert '"plot": ["matplotlib"]' in setup


def test_a_missing_optional_dependency_names_its_extra():
    with pytest.raises(ModuleNotFoundError, match=r'plot_learning_curve needs no_such_package_xyz, which is not '
                                                  r'installed: pip install "paddlefsl\[plot\]"'):
        require("no_such_package_xyz", "plot", "plot_learning_curve")
    assert require("json", "plot", "x").__name__ == "json"


def test_plot_learning_curve_without_matplotlib_names_the_plot_extra(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from paddlefsl.training import plot_learning_curve\n"
            f"plot_learning_curve([{{'iteration': 1, 'loss': 1.0}}], {str(tmp_path / 'c.png')!r})")
    run = _run(code)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        'ModuleNotFoundError: plot_learning_curve needs matplotlib, which is not installed: '
        'pip install "paddlefsl[plot]" (or pip install matplotlib)')
