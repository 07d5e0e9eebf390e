"""Checks that our LoRA adapters and Hugging Face PEFT's are interchangeable.

Run through bench/peft_interop.sh (it builds the trainer and installs peft).

1. A PyTorch SegNet (bench/torch_segnet.py, the trainer's parameter names)
   gets random weights and BatchNorm statistics; its state dict is the base.
2. PEFT -> ours: PEFT wraps it with LoRA on every `conv` and on the
   squeeze-excitation block's nn.Linear `fc1`/`fc2` (plus the head in
   modules_to_save), init_lora_weights=False so B is not zero, and
   save_pretrained() writes the adapter; PEFT's logits on a fixed input are
   compared with `trainyard-trainer adapter logits` on the same base+adapter.
3. ours -> PEFT: `trainyard-trainer adapter init --random-b` writes an
   adapter; PeftModel.from_pretrained() loads it onto the same base, and its
   logits are compared with ours.
4. Merge: `trainyard-trainer adapter merge` writes a full checkpoint whose
   weights, loaded into plain PyTorch, give PEFT's merged logits.

All three for plain LoRA and for DoRA (use_dora, magnitudes moved off their
initial norms). Prints one JSON line with the largest absolute differences;
exits 1 when any exceeds 1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torch_segnet import SegNet  # noqa: E402

TRAINER = sys.argv[1]
WIDTHS = (4, 8)
MODEL = ["--set", "model.widths=[4, 8]", "--set", "model.classes=4",
         "--set", "model.squeeze_excitation=true"]
TARGETS = ["conv", "fc1", "fc2"]
torch.manual_seed(0)


def base_net():
    net = SegNet(widths=WIDTHS, convs_per_stage=2, classes=4, decoder="unpool", squeeze_excitation=True)
    net.load_state_dict(base_state, strict=False)
    return net.eval()


def run(*args):
    subprocess.run([TRAINER, "adapter", *args, *MODEL], check=True)


def ours_logits(adapter_dir):
    out = os.path.join(work, "ours.safetensors")
    run("logits", "--base", base_path, "--adapter", adapter_dir, "--input", x_path, "--out", out)
    return load_file(out)["logits"]


work = tempfile.mkdtemp()
net = SegNet(widths=WIDTHS, convs_per_stage=2, classes=4, decoder="unpool", squeeze_excitation=True).eval()
with torch.no_grad():
    for name, buf in net.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn_like(buf) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand_like(buf) + 0.5)
base_state = {k: v.clone() for k, v in net.state_dict().items()}
base_path = os.path.join(work, "base.safetensors")
save_file({k: v.contiguous() for k, v in base_state.items()}, base_path)
# Large inputs, so that every adapter (the small squeeze-excitation ones too)
# moves the logits far above float rounding.
x = torch.randn(2, 3, 16, 16) * 20
x_path = os.path.join(work, "x.safetensors")
save_file({"x": x}, x_path)


def roundtrip(dora):
    """Max |Δlogit| PEFT->ours, ours->PEFT and merged, for LoRA or DoRA."""
    tag = "dora" if dora else "lora"
    # PEFT -> ours.
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, modules_to_save=["head"],
                        init_lora_weights=False, use_dora=dora)
    peft_model = get_peft_model(base_net(), config).eval()
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.add_(0.1)
        for name, p in peft_model.named_parameters():
            # Magnitudes off their initial norms, so the decomposition matters.
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.8, 1.2, p.numel()).reshape(p.shape))
    peft_dir = os.path.join(work, f"peft-{tag}")
    peft_model.save_pretrained(peft_dir)
    with torch.no_grad():
        want = peft_model(x)
    peft_to_ours = (ours_logits(peft_dir) - want).abs().max().item()

    # ours -> PEFT.
    cfg_path = os.path.join(work, f"{tag}_config.json")
    with open(cfg_path, "w") as f:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": TARGETS,
                   "modules_to_save": ["head"], "use_dora": dora}, f)
    ours_dir = os.path.join(work, f"our-{tag}")
    run("init", "--base", base_path, "--peft-config", cfg_path, "--out", ours_dir, "--random-b", "7")
    loaded = PeftModel.from_pretrained(base_net(), ours_dir).eval()
    # PEFT really wrapped the linear layers and filled them from our file.
    for name in ("se.fc1", "se.fc2"):
        layer = loaded.base_model.model.get_submodule(name)
        assert type(layer).__name__ == "Linear" and hasattr(layer, "lora_B"), (name, type(layer))
        assert layer.lora_B["default"].weight.abs().sum() > 0, f"{name}: B not loaded"
        assert bool(layer.lora_magnitude_vector) == dora, f"{name}: DoRA is {dora}"
    with torch.no_grad():
        theirs = loaded(x)
    ours_to_peft = (ours_logits(ours_dir) - theirs).abs().max().item()

    # Merge: our merged checkpoint in plain PyTorch equals PEFT's merged model.
    merged_path = os.path.join(work, f"merged-{tag}.safetensors")
    run("merge", "--base", base_path, "--adapter", ours_dir, "--out", merged_path)
    merged = {k.removeprefix("model."): v for k, v in load_file(merged_path).items() if k.startswith("model.")}
    plain = SegNet(widths=WIDTHS, convs_per_stage=2, classes=4, decoder="unpool", squeeze_excitation=True)
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        merged_gap = (plain.eval()(x) - loaded.merge_and_unload()(x)).abs().max().item()
    return {f"{tag}_peft_to_ours_max_abs": peft_to_ours, f"{tag}_ours_to_peft_max_abs": ours_to_peft,
            f"{tag}_merged_max_abs": merged_gap, f"{tag}_logit_scale": want.abs().max().item()}


result = {**roundtrip(False), **roundtrip(True),
          "peft": __import__("peft").__version__, "torch": torch.__version__}
print(json.dumps(result))
gaps = [v for k, v in result.items() if k.endswith("_max_abs")]
sys.exit(0 if max(gaps) <= 1e-4 else 1)
