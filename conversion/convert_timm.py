"""Convert a timm checkpoint to an fseg_jax model directory (same options as `fseg-jax convert`).

    python conversion/convert_timm.py --preset uni --out weights/uni                 # fetch from the hub
    python conversion/convert_timm.py --preset uni --checkpoint pytorch_model.bin --out weights/uni
    python conversion/convert_timm.py --timm-config config.json --checkpoint model.safetensors --out out/
"""

from fseg_jax.cli.convert import convert

if __name__ == "__main__":
    convert(prog_name="convert_timm.py")
