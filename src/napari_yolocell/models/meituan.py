"""meituan/YOLOv6 checkpoints (``tools/train.py`` output), run without the ``yolov6`` package.

The checkpoint's pickle names classes of the meituan repository (``yolov6.models.yolo.Model``,
``yolov6.layers.common.RepVGGBlock``...). :func:`napari_yolocell.models.safety.safe_load` maps
them to the classes below: ``torch.nn.Module`` subclasses that receive the pickled attributes
(sub-modules, parameters, ``nc``, ``stride``, ``use_dfl``...) and add a forward pass written
here from the published architecture (EfficientRep backbone, Rep-BiFPAN neck, efficient
decoupled anchor-free head). No code of that (GPL) repository is used.

The network returns ``(N, anchors, 5 + nc)``: box centre/size in input pixels, an objectness
of 1 (the head has none) and the sigmoid class scores, as meituan's own ``Detect`` does; see
:func:`napari_yolocell.models.classic.ObjectnessToScores` for the layout the engine uses.
"""

from __future__ import annotations

import torch
from torch import nn

#: Checkpoint classes this module can run (the YOLOv6 3.x "N/S" family: RepVGG blocks).
_PREFIX = "yolov6."


def _has(module: nn.Module, name: str) -> bool:
    return module._modules.get(name) is not None


class ConvModule(nn.Module):
    """conv -> bn (-> act when the checkpoint has one)."""

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.act(x) if _has(self, "act") else x


class _Block(nn.Module):
    """ConvBNReLU / ConvBNSiLU / ConvBNHS: a wrapped :class:`ConvModule`."""

    def forward(self, x):
        return self.block(x)


class RepVGGBlock(nn.Module):
    """3x3 conv-bn + 1x1 conv-bn (+ identity bn), summed; or the fused ``rbr_reparam``."""

    def forward(self, x):
        se = self.se if _has(self, "se") else (lambda t: t)
        if _has(self, "rbr_reparam"):
            return self.nonlinearity(se(self.rbr_reparam(x)))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if _has(self, "rbr_identity"):
            out = out + self.rbr_identity(x)
        return self.nonlinearity(se(out))


class RepBlock(nn.Module):
    """``conv1`` then the ``block`` sequence."""

    def forward(self, x):
        x = self.conv1(x)
        return self.block(x) if _has(self, "block") else x


class Transpose(nn.Module):
    """2x learned up-sampling."""

    def forward(self, x):
        return self.upsample_transpose(x)


class _Pyramid(nn.Module):
    """SPPF / CSP-SPPF wrappers: the ``sppf`` or ``cspsppf`` child."""

    def forward(self, x):
        inner = self.cspsppf if _has(self, "cspsppf") else self.sppf
        return inner(x)


class SPPFModule(nn.Module):
    """cv1 -> three chained max-pools -> concat -> cv2."""

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class CSPSPPFModule(nn.Module):
    """CSP split around an SPPF: one branch cv2, the other cv1-cv3-cv4, pools, cv5-cv6."""

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat([x1, y1, y2, self.m(y2)], 1)))
        return self.cv7(torch.cat([y0, y3], 1))


class BiFusion(nn.Module):
    """Fuse the up-sampled deeper map, the current map and the down-sampled shallower map."""

    def forward(self, x):
        x0 = self.upsample(x[0])
        x1 = self.cv1(x[1])
        x2 = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat([x0, x1, x2], 1))


class EfficientRep(nn.Module):
    """Backbone: stem and four stages; returns the P2 (if ``fuse_P2``), P3, P4, P5 maps."""

    def forward(self, x):
        outputs = []
        x = self.ERBlock_2(self.stem(x))
        if getattr(self, "fuse_P2", False):
            outputs.append(x)
        x = self.ERBlock_3(x)
        outputs.append(x)
        x = self.ERBlock_4(x)
        outputs.append(x)
        outputs.append(self.ERBlock_5(x))
        return outputs


class RepBiFPANNeck(nn.Module):
    """Top-down BiFusion path then bottom-up path; returns the P3, P4, P5 outputs."""

    def forward(self, inputs):
        x3, x2, x1, x0 = inputs
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, x1, x2]))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1([fpn_out1, x2, x3]))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class Detect(nn.Module):
    """Decoupled anchor-free head (``use_dfl=False``): ltrb distances around grid points."""

    def forward(self, feats):
        if getattr(self, "use_dfl", False):
            raise ValueError("meituan YOLOv6 heads with DFL (use_dfl=True) are not supported")
        offset = float(getattr(self, "grid_cell_offset", 0.5))
        boxes, scores = [], []
        for i, feat in enumerate(feats):
            b, _, h, w = feat.shape
            feat = self.stems[i](feat)
            cls = torch.sigmoid(self.cls_preds[i](self.cls_convs[i](feat)))
            reg = self.reg_preds[i](self.reg_convs[i](feat))
            ys = torch.arange(h, dtype=feat.dtype, device=feat.device) + offset
            xs = torch.arange(w, dtype=feat.dtype, device=feat.device) + offset
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            points = torch.stack([gx, gy], -1).reshape(1, h * w, 2)
            dist = reg.reshape(b, 4, h * w).permute(0, 2, 1)
            x0y0 = points - dist[..., :2]
            x1y1 = points + dist[..., 2:]
            stride = float(self.stride[i])
            boxes.append(torch.cat([(x0y0 + x1y1) / 2, x1y1 - x0y0], -1) * stride)
            scores.append(cls.reshape(b, self.nc, h * w).permute(0, 2, 1))
        box = torch.cat(boxes, 1)
        score = torch.cat(scores, 1)
        return torch.cat([box, torch.ones_like(box[..., :1]), score], -1)


class Model(nn.Module):
    """backbone -> neck -> detect."""

    def forward(self, x):
        return self.detect(self.neck(self.backbone(x)))


_CLASSES = {
    "yolov6.models.yolo.Model": Model,
    "yolov6.models.efficientrep.EfficientRep": EfficientRep,
    "yolov6.models.reppan.RepBiFPANNeck": RepBiFPANNeck,
    "yolov6.models.effidehead.Detect": Detect,
    "yolov6.layers.common.RepVGGBlock": RepVGGBlock,
    "yolov6.layers.common.RepBlock": RepBlock,
    "yolov6.layers.common.ConvModule": ConvModule,
    "yolov6.layers.common.ConvBNReLU": _Block,
    "yolov6.layers.common.ConvBNSiLU": _Block,
    "yolov6.layers.common.ConvBNHS": _Block,
    "yolov6.layers.common.SimCSPSPPF": _Pyramid,
    "yolov6.layers.common.SimSPPF": _Pyramid,
    "yolov6.layers.common.SPPF": _Pyramid,
    "yolov6.layers.common.CSPSPPFModule": CSPSPPFModule,
    "yolov6.layers.common.SPPFModule": SPPFModule,
    "yolov6.layers.common.BiFusion": BiFusion,
    "yolov6.layers.common.Transpose": Transpose,
}


def standins() -> dict[str, type]:
    """Checkpoint class name -> runnable stand-in, for :func:`safety.safe_load`.

    One subclass per name, so each module remembers which original class it replaces.
    """
    out = {}
    for name, base in _CLASSES.items():
        out[name] = _named(name, base)
    return out


_NAMED: dict[str, type] = {}


def _named(fullname: str, base: type) -> type:
    if fullname not in _NAMED:
        short = fullname.rpartition(".")[2]
        _NAMED[fullname] = type(short, (base,), {"origin": fullname})
    return _NAMED[fullname]


def build(ckpt: dict, path) -> nn.Module:
    """The runnable float32 network of a safely loaded meituan checkpoint.

    Raises
    ------
    ValueError
        The checkpoint holds a module class this loader cannot run (names it).
    """
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{str(path)!r} holds no YOLOv6 model")
    for module in model.modules():
        origin = getattr(type(module), "origin", "")
        if origin.startswith(_PREFIX) and origin not in _CLASSES:
            raise ValueError(
                f"{str(path)!r}: meituan YOLOv6 module {origin} is not supported "
                "(supported: the RepVGG-based N/S models with use_dfl=False)"
            )
    if type(model).__name__ != "Model" or not _has(model, "detect"):
        raise ValueError(f"{str(path)!r} is not a meituan YOLOv6 detection model")
    if getattr(model.detect, "use_dfl", False):
        raise ValueError(f"{str(path)!r}: YOLOv6 heads with DFL (use_dfl=True) are not supported")
    return model.float().eval()
