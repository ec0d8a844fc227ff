# The two commands of the README. Both set up .venv themselves (scripts/setup_env.sh).
.PHONY: demo test test-all lint

# Fuse MobileNetV3-Large, check it against native, print the per-layer timing table (GPU if present, else CPU).
demo:
	scripts/setup_env.sh
	.venv/bin/python -m mnet_ext.profile --model mobilenet_v3_large

# The test suite (CUDA-marked tests skip with a reason when there is no GPU; exhaustive sweeps are deselected).
test:
	scripts/setup_env.sh
	.venv/bin/python -m pytest

# Everything, exhaustive sweeps included.
test-all:
	scripts/setup_env.sh
	.venv/bin/python -m pytest -m "exhaustive or not exhaustive"

lint:
	.venv/bin/ruff check mnet_ext triton_kernels tests bench setup.py
