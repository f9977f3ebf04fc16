#!/usr/bin/env bash
# PaddleNLP requires the old PyPI `paddlefsl` (1.1.0) by name. Install this package and PaddleNLP in both orders, each
# in a fresh venv, and check that our paddlefsl (2.x, from this checkout) stays in place and PaddleNLP still imports.
# Usage: .ci/install_order.sh [WORKDIR]   (venvs go under WORKDIR, default a temporary folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
nlp=(paddlenlp==2.8.1 "huggingface_hub<0.25" aistudio-sdk==0.2.6 "datasets<3" "pyarrow<16" "numpy<2")

check() {  # $1: venv; our paddlefsl from this checkout, version 2.x, and PaddleNLP imports
    (cd "$work" && "$1/bin/python" "$repo/.ci/check_install.py" "$repo")
}

for order in ours-first nlp-first; do
    venv="$work/venv-$order"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    if [ "$order" = ours-first ]; then
        "$venv/bin/pip" install --quiet -e "$repo[cpu,test]"
        "$venv/bin/pip" install --quiet "${nlp[@]}"
    else
        # paddlefsl==1.1.0 is what PyPI resolves PaddleNLP's unversioned `paddlefsl` to (a local wheel cache might
        # offer a build of this checkout instead); name it so that this order really starts from the old package.
        "$venv/bin/pip" install --quiet "paddlepaddle>=3.0" "${nlp[@]}" paddlefsl==1.1.0
        (cd "$work" && "$venv/bin/python" "$repo/.ci/check_install.py" --old)
        "$venv/bin/pip" install --quiet -e "$repo[cpu,test]"
    fi
    echo -n "$order: "
    check "$venv"
done
