#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_check.sh installs on the CUDA machine, into .whl/ (git-ignored; copy it
# with the working tree). The CUDA machine it was prepared for has Python 3.12, torch 2.11, torchvision 0.26,
# numpy, scipy, h5py, opencv-python-headless, timm, transformers 5.x and huggingface_hub 1.x, and reaches no registry.
# What the benchmarks and tests import beyond that (traced with sys.modules after a run here) is listed below, pinned
# to the versions this project's .venv runs together; transformers 4.57, tokenizers 0.22 and huggingface_hub 0.36
# replace the image's newer ones on PYTHONPATH, since rfdetr 1.5.2 needs transformers < 5 and python-doctr 0.11.0
# huggingface_hub < 1 (transformers checks its pins at import). About 37 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  python-doctr==0.11.0 rfdetr==1.5.2                                   # the frameworks
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2      # rfdetr's backbone, pinned below the image's
  peft==0.21.2 supervision==0.31.2 pydeprecate==0.13.0 roboflow==1.7.3 # imported by rfdetr
  pycocotools==2.0.11                                                  # evaluation (rfdetr, tests/patches/detr/reference.py)
  albumentations==1.4.24 albucore==0.0.23 simsimd==6.5.16 stringzilla==5.3.2   # rfdetr's dataset transforms
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5   # for albumentations
  typing_extensions==4.16.0                                            # pydantic 2.14 needs a recent one
  pyclipper==1.4.0 shapely==2.2.0 rapidfuzz==3.14.6 pypdfium2==4.30.0 anyascii==0.3.3 defusedxml==0.7.1  # doctr
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}"
# langdetect (imported by doctr) is published as a source archive only: build its pure-Python wheel here
"$PY" -m pip wheel -q --no-deps -w .whl langdetect==1.0.9
ls -1 .whl
du -ch .whl/*.whl | tail -1
