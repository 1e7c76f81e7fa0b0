"""The Dice ceiling of a network grid: reference labels taken to the target spacing and back.

Each organ's mask is smoothed by the spacing change, sampled on the network's grid (as
``prepare`` places it), resampled back onto the input grid like the network's probabilities,
and the argmax is scored. What a perfect network on that grid could reach.

    python benchmarks/grid_ceiling.py DATA_DIR 3,3,6
"""
import glob
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FINESegmentation"))
from FINESegmentationLib.io import read_volume, volume_to_sitk  # noqa: E402
from FINESegmentationLib.preprocessing import PreparedVolume, probabilities_to_input_grid
from FINESegmentationLib.evaluation import case_metrics
from FINESegmentationLib.volume import Volume
sp = [float(x) for x in sys.argv[2].split(",")]
res = []
for lab in sorted(glob.glob(str(Path(sys.argv[1]) / "labelsTr" / "*.nii.gz"))):
    ref = read_volume(lab)
    img = sitk.DICOMOrient(volume_to_sitk(Volume(ref.array.astype(np.float32), ref.geometry)), "LPS")
    spacing = np.array(img.GetSpacing()); target = np.array(sp)
    size = np.maximum(1, np.round(np.array(img.GetSize()) * spacing / target)).astype(int)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin()) + direction @ ((target - spacing) / 2)
    arr = sitk.GetArrayFromImage(img).astype(np.int64)
    sig = [max(0.0, (t - s) / 2.355) for t, s in zip(target, spacing)]  # FWHM of the spacing change
    probs = []
    grid = None
    for c in range(9):
        oh = sitk.GetImageFromArray((arr == c).astype(np.float32)); oh.CopyInformation(img)
        # area-like downsampling: smooth by the spacing ratio, then sample
        oh = sitk.SmoothingRecursiveGaussian(oh, sig) if max(sig) > 0 else oh
        r = sitk.Resample(oh, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(), target.tolist(), img.GetDirection(), 1.0 if c == 0 else 0.0, sitk.sitkFloat32)
        probs.append(sitk.GetArrayFromImage(r)); grid = r
    prep = PreparedVolume(array=probs[0], grid=grid)
    back = probabilities_to_input_grid(np.stack(probs), prep, ref)
    pred = Volume(back.argmax(0).astype(np.uint8), ref.geometry)
    m = case_metrics(pred, ref)
    d = {k: v["dice"] for k, v in m.items()}
    res.append(d)
    print(lab.split("/")[-1], {k: round(v*100, 1) for k, v in d.items()}, flush=True)
organs = res[0].keys()
means = {o: np.nanmean([r.get(o, np.nan) for r in res]) * 100 for o in organs}
print({o: round(v, 1) for o, v in means.items()}, "mean", round(np.mean(list(means.values())), 1))
