"""Check that our paddlefsl (2.x, from this checkout) is the one installed and that PaddleNLP still imports.

PaddleNLP requires the old PyPI ``paddlefsl`` (1.1.0) by name; whichever order the two are installed in, ours must
stay in place. Usage: ``python .ci/check_install.py REPO`` (run as a script, so the checkout is not on ``sys.path``
unless the editable install put it there). ``--old`` checks the opposite: that the old 1.x package is installed.
"""
import os
import sys
from importlib.metadata import version

if "--old" in sys.argv[1:]:
    assert version("paddlefsl").startswith("1."), f"expected the old paddlefsl 1.x, found {version('paddlefsl')}"
    print(f"old paddlefsl {version('paddlefsl')} in place")
    sys.exit(0)

import paddlefsl  # noqa: E402
import paddlenlp  # noqa: E402

repo = os.path.realpath(sys.argv[1])
assert os.path.realpath(paddlefsl.__file__).startswith(repo), f"paddlefsl imported from {paddlefsl.__file__}"
assert version("paddlefsl").startswith("2."), f"paddlefsl version {version('paddlefsl')}"
from paddlefsl.metaopt import MAML  # noqa: E402,F401  (the 1.x package has no metaopt)
from paddlenlp.transformers import ErnieModel  # noqa: E402,F401

print(f"ok: paddlefsl {version('paddlefsl')} from {os.path.dirname(paddlefsl.__file__)}, paddlenlp {paddlenlp.__version__}")
