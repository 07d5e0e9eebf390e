"""PyTorch reference of Trainyard's SegNet family.

Module paths equal the trainer's parameter names (encoder.0.convs.1.conv.weight,
decoder.2.convs.0.bn.running_var, head.weight, ...), so a state dict moves
between the two with no renaming. Used by the fixture generator of the trainer
tests and by the CPU benchmark.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Stage(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.convs = nn.ModuleList(ConvBnRelu(a, b) for a, b in channels)

    def forward(self, x):
        for block in self.convs:
            x = block(x)
        return x


class SqueezeExcitation(nn.Module):
    """Channel re-weighting from global context, with nn.Linear layers."""

    def __init__(self, channels):
        super().__init__()
        hidden = max(channels // 4, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class SegNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), convs_per_stage=2, classes=4,
                 in_channels=3, decoder="unpool", boundary_head=False,
                 squeeze_excitation=False):
        super().__init__()
        k = convs_per_stage
        enc, cin = [], in_channels
        for w in widths:
            enc.append(Stage([(cin if j == 0 else w, w) for j in range(k)]))
            cin = w
        self.encoder = nn.ModuleList(enc)
        dec = []
        for i in reversed(range(len(widths))):
            w = widths[i]
            out = w if i == 0 else widths[i - 1]
            dec.append(Stage([(w, out if j + 1 == k else w) for j in range(k)]))
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Conv2d(widths[0], classes, 1)
        self.boundary_head = nn.Conv2d(widths[0], 1, 1) if boundary_head else None
        self.se = SqueezeExcitation(widths[-1]) if squeeze_excitation else None
        self.decoder_kind = decoder

    def forward(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            size = x.shape[-2:]
            if self.decoder_kind == "unpool":
                x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            else:
                x, idx = F.max_pool2d(x, 2, 2), None
            skips.append((idx, size))
        if self.se is not None:
            x = self.se(x)
        for stage in self.decoder:
            idx, size = skips.pop()
            if self.decoder_kind == "unpool":
                x = F.max_unpool2d(x, idx, 2, 2, output_size=size)
            else:
                x = F.interpolate(x, size=size, mode="nearest")
            x = stage(x)
        return self.head(x)
