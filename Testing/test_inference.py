"""Whole-volume inference: geometry, bank modes, devices, cancellation, bad volumes."""
import threading

import numpy as np
import pytest
import torch

from conftest import make_ct
from FINESegmentationLib import Segmenter
from FINESegmentationLib.checkpoints import load_checkpoint
from FINESegmentationLib.errors import CancelledError, DeviceError, InputError
from FINESegmentationLib.inference import VolumeTokenBank, count_crops, keep_largest_components, resolve_device
from FINESegmentationLib.io import read_volume
from FINESegmentationLib.volume import Geometry, Volume


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return Segmenter(str(tiny_checkpoint), device="cpu", bank="stateless", fast=True)


def test_labels_of_a_real_ct_have_the_input_geometry(tiny_checkpoint, ct_chest_path):
    ct = read_volume(ct_chest_path)
    result = Segmenter(str(tiny_checkpoint), device="cpu", fast=True).segment(ct)
    assert result.labels.shape == ct.shape and result.labels.geometry == ct.geometry, "labels lie on the CT's own grid"
    assert result.labels.array.dtype == np.uint8 and result.labels.array.max() <= 8
    assert result.report["passes"] == 1 and result.report["bank"] == "stateless", "stateless is the default and runs one pass"


def test_oblique_anisotropic_geometry_is_kept_exactly(segmenter):
    c, s = np.cos(0.3), np.sin(0.3)
    ct = make_ct(spacing=(3.7, 4.1, 7.5), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    result = segmenter.segment(ct)
    assert result.labels.geometry == ct.geometry and result.labels.shape == ct.shape, "oblique geometry survives inference"


def test_a_mirrored_copy_with_mirrored_geometry_gets_the_same_labels(segmenter):
    # A spacing whose voxel centres never fall halfway between the network's 3 mm voxels, so
    # nearest-neighbour resampling has no ties to break differently.
    ct = make_ct(seed=3, spacing=(3.7, 4.3, 7.1))
    g = ct.geometry
    flipped_origin = (g.origin[0] + (ct.shape[2] - 1) * g.spacing[0], g.origin[1], g.origin[2])
    mirrored = Volume(ct.array[:, :, ::-1].copy(), Geometry(g.spacing, flipped_origin, (-1, 0, 0, 0, 1, 0, 0, 0, 1)))
    a = segmenter.segment(ct).labels.array
    b = segmenter.segment(mirrored).labels.array[:, :, ::-1]
    assert np.array_equal(a, b), "the same anatomy stored in another orientation is segmented identically"


def test_accumulate_fills_the_bank_and_changes_the_prediction(tiny_checkpoint):
    ct = make_ct(shape=(24, 96, 96), spacing=(4.0, 4.0, 8.0))
    acc = Segmenter(str(tiny_checkpoint), device="cpu", bank="accumulate", fast=True).segment(ct, probabilities=True)
    sta = Segmenter(str(tiny_checkpoint), device="cpu", bank="stateless", fast=True).segment(ct, probabilities=True)
    assert acc.report["passes"] == 2 and sta.report["passes"] == 1
    assert acc.report["crops_per_pass"] == sta.report["crops_per_pass"] > 1
    assert np.abs(acc.probabilities - sta.probabilities).max() > 0, "the filled bank reaches the second pass's predictions"


def test_bank_merge_counts_visits_and_averages_states(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    bank = VolumeTokenBank(model, torch.device("cpu"))
    x = torch.randn(2, 1, *model.config.crop_size)
    positions = torch.tensor([[0.0, -60.0, -60.0], [0.0, 60.0, 60.0]])
    with torch.no_grad():
        out = model(x, positions, bank.for_batch(2))
    bank.merge(out.state)
    assert int(bank.state.visits.sum()) == 8, "two crops of four cells each are counted"
    assert torch.allclose(bank.state.tokens["encoder0"][0], out.state.tokens["encoder0"].mean(0)), "a batch's states are averaged"


def test_count_crops_matches_the_windows_monai_takes(tiny_checkpoint):
    from monai.inferers import sliding_window_inference

    calls = []
    for shape, overlap in [((57, 130, 130), 0.5), ((20, 50, 70), 0.25), ((32, 64, 64), 0.5)]:
        def predictor(x, slices):
            calls.append(len(slices))
            return x
        sliding_window_inference(torch.zeros(1, 1, *shape), (32, 64, 64), 1, predictor, overlap=overlap, with_coord=True)
        assert sum(calls) == count_crops(shape, (32, 64, 64), overlap), f"crop count for {shape} at overlap {overlap}"
        calls.clear()


def test_volume_smaller_than_a_crop_is_padded(segmenter):
    ct = make_ct(shape=(6, 20, 20), spacing=(4.0, 4.0, 8.0))
    result = segmenter.segment(ct)
    assert result.labels.shape == ct.shape and result.report["crops_per_pass"] == 1, "a small volume is one padded crop"


def test_a_thin_slab_is_segmented_on_half_the_model_slice_spacing_whatever_its_orientation(segmenter):
    from FINESegmentationLib.preprocessing import THIN_SLAB_MM, axial_extent_mm, network_spacing

    pre = segmenter.info.preprocessing
    slab = make_ct(shape=(10, 40, 40), spacing=(4.0, 4.0, 4.0))  # 40 mm along the body
    whole = make_ct(shape=(24, 40, 40), spacing=(4.0, 4.0, 4.0))  # 96 mm
    assert axial_extent_mm(slab) == 40.0 and axial_extent_mm(whole) == 96.0 and THIN_SLAB_MM == 60.0
    assert network_spacing(slab, pre) == (3.0, 3.0, 3.0) and network_spacing(whole, pre) == (3.0, 3.0, 6.0)
    assert network_spacing(slab, pre, None) == (3.0, 3.0, 6.0), "None turns the rule off"
    # The same slab stored coronally (voxel axis j along the body, 10 voxels of 4 mm): still 40 mm.
    coronal = Volume(np.ascontiguousarray(slab.array.transpose(1, 0, 2)),
                     Geometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 0, 1, 0, 1, 0)))
    assert axial_extent_mm(coronal) == 40.0
    result = segmenter.segment(slab)
    assert result.report["thin_slab"] and result.report["network_spacing_xyz"] == [3.0, 3.0, 3.0]
    assert result.report["network_shape_zyx"][0] == 13 and result.labels.shape == slab.shape
    assert not segmenter.segment(whole).report["thin_slab"]


def test_the_thin_slab_grid_can_be_turned_off(tiny_checkpoint):
    slab = make_ct(shape=(10, 40, 40), spacing=(4.0, 4.0, 4.0))
    report = Segmenter(str(tiny_checkpoint), device="cpu", fast=True, thin_slab=False).segment(slab).report
    assert not report["thin_slab"] and report["network_spacing_xyz"] == [3.0, 3.0, 6.0] and report["network_shape_zyx"][0] == 7


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((10, 40, 40), np.nan, np.float32), "NaN"),
        (np.full((10, 40, 40), -1000.0, np.float32), "empty"),
        (np.zeros((1, 40, 40), np.float32), "too small"),
    ],
)
def test_unusable_volumes_get_one_sentence(segmenter, array, message):
    with pytest.raises(InputError, match=message) as err:
        segmenter.segment(Volume(array))
    assert "\n" not in str(err.value)


def test_mr_like_intensities_are_segmented_with_a_warning(segmenter):
    ct = make_ct()
    mr = Volume(np.clip((ct.array + 1000) / 4, 0, None), ct.geometry)
    result = segmenter.segment(mr)
    assert any("MR" in w for w in result.report["warnings"]), "an MR-like range is flagged in the report"


def test_cancel_stops_and_writes_nothing(tiny_checkpoint, tmp_path):
    from FINESegmentationLib.io import write_volume

    source = write_volume(make_ct(), tmp_path / "ct.nii.gz")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        Segmenter(str(tiny_checkpoint), device="cpu").segment_file(source, tmp_path / "out.seg.nrrd", cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"], "a cancelled job leaves no file behind"


def test_unwritable_output_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    from FINESegmentationLib.io import write_volume

    source = write_volume(make_ct(), tmp_path / "ct.nii.gz")
    progress = []
    with pytest.raises(InputError, match="does not exist"):
        Segmenter(str(tiny_checkpoint), device="cpu").segment_file(source, tmp_path / "missing" / "out.seg.nrrd", progress=progress.append)
    assert not progress, "no crop ran for a job whose output cannot be written"


def test_auto_device_falls_back_to_the_cpu_and_a_missing_gpu_is_refused():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("tpu9")


def test_unknown_bank_mode_is_refused(tiny_checkpoint):
    with pytest.raises(InputError, match="Unknown bank mode"):
        Segmenter(str(tiny_checkpoint), device="cpu", bank="sometimes")


def _sphere_probabilities(prepared_shape, centre, radius, spacing):
    """Two-class probabilities of a ball on a grid: a soft edge one voxel wide, as a network gives."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(prepared_shape, spacing)], indexing="ij")
    distance = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    inside = 1.0 / (1.0 + np.exp((distance - radius) / (0.5 * min(spacing))))
    return np.stack([1.0 - inside, inside]).astype(np.float32)


def test_labels_on_a_finer_input_grid_are_the_argmax_of_the_resampled_probabilities():
    """A ball predicted on the coarse prepared grid: taken to the 4x finer input grid through its probabilities
    (linear, then argmax) it is closer to the true ball than the coarse labels' blocks (nearest neighbour),
    and the boxes the argmax is restricted to change nothing against resampling every class everywhere."""
    import SimpleITK as sitk

    from FINESegmentationLib.checkpoints import Preprocessing
    from FINESegmentationLib.preprocessing import (_on_prepared_grid, _reference_grid, argmax_on_input_grid,
                                                   labels_to_input_grid, prepare)

    fine = Volume(np.random.default_rng(1).normal(40.0, 20.0, (96, 96, 96)).astype(np.float32), Geometry(spacing=(0.75, 0.75, 0.75)))
    pre = Preprocessing(target_spacing=(3.0, 3.0, 3.0), orientation="LPS", clip=(-1000.0, 1000.0), mean=0.0, std=1.0)
    prepared = prepare(fine, pre)
    assert prepared.array.shape == (24, 24, 24)
    # The prepared grid's first voxel centre lies 1.125 mm past the input's; the ball is centred in physical mm.
    centre, radius = np.array([36.0, 30.0, 33.0]), 17.0
    shift = 1.125
    probs = _sphere_probabilities(prepared.array.shape, centre - shift, radius, (3.0, 3.0, 3.0))
    zz, yy, xx = np.meshgrid(*[np.arange(96) * 0.75] * 3, indexing="ij")
    truth = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    smooth = argmax_on_input_grid(probs, prepared, fine).array == 1
    blocks = labels_to_input_grid(probs.argmax(0).astype(np.uint8), prepared, fine).array == 1
    assert dice(smooth, truth) > dice(blocks, truth) + 0.02, (dice(smooth, truth), dice(blocks, truth))
    assert dice(smooth, truth) > 0.97  # measured 0.992 (blocks 0.935)

    # Three organs with soft edges: the boxed argmax equals the argmax of every class resampled everywhere.
    rng = np.random.default_rng(0)
    many = np.stack([_sphere_probabilities(prepared.array.shape, rng.uniform(15, 55, 3), r, (3.0, 3.0, 3.0))[1]
                     for r in (6.0, 9.0, 12.0)])
    many = np.concatenate([np.full((1, *many.shape[1:]), 0.3, np.float32), many])
    many /= many.sum(0)
    grid = _reference_grid(fine, sitk.sitkFloat32)
    every = np.stack([sitk.GetArrayFromImage(sitk.Resample(_on_prepared_grid(np.ascontiguousarray(p), prepared), grid, sitk.Transform(),
                                                           sitk.sitkLinear, 1.0 if c == 0 else 0.0, sitk.sitkFloat32))
                      for c, p in enumerate(many)]).argmax(0)
    boxed = argmax_on_input_grid(many, prepared, fine).array
    assert set(np.unique(boxed)) == {0, 1, 2, 3}
    assert np.array_equal(boxed, every)
    assert np.array_equal(argmax_on_input_grid(many, prepared, fine, chunk_slices=7).array, every), "slabs of 7 slices"


def test_largest_component_keeps_one_blob_per_organ():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = 5
    labels[7:9, 7:9, 7:9] = 5
    labels[0, 9, 9] = 2
    keep_largest_components(labels)
    assert (labels == 5).sum() == 27 and (labels == 2).sum() == 1, "only the smaller liver blob is removed"

    pieces = np.zeros((10, 10, 10), np.uint8)
    pieces[1:4, 1:4, 1:4] = 8
    pieces[7:9, 7:9, 7:9] = 8
    pieces[5, 0:3, 0:3] = 5
    pieces[5, 8, 0] = 5
    keep_largest_components(pieces, [5])
    assert (pieces == 8).sum() == 35 and (pieces == 5).sum() == 9, "only the chosen values are reduced to their largest piece"


def test_the_default_keeps_the_largest_component_of_every_organ_but_the_pancreas(tiny_checkpoint):
    names = lambda seg: [seg.info.class_names[i] for i in seg.largest_component_classes]  # noqa: E731
    default = Segmenter(str(tiny_checkpoint), device="cpu", fast=True)
    assert names(default) == ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta"]
    assert "pancreas" not in names(default), "the pancreas, often found in pieces, keeps them"
    assert len(names(Segmenter(str(tiny_checkpoint), device="cpu", fast=True, largest_component=True))) == 8
    assert names(Segmenter(str(tiny_checkpoint), device="cpu", fast=True, largest_component=False)) == []
    report = default.segment(make_ct()).report
    assert report["largest_component"] == names(default), "the report says which organs were reduced"


def test_progress_reports_both_passes(tiny_checkpoint):
    seen = []
    Segmenter(str(tiny_checkpoint), device="cpu", bank="accumulate", fast=True).segment(make_ct(), progress=seen.append)
    assert {p.pass_index for p in seen} == {1, 2} and seen[-1].crop == seen[-1].crops, "progress covers pass 1/2 and 2/2 to the last crop"
    seen = []
    Segmenter(str(tiny_checkpoint), device="cpu", fast=True).segment(make_ct(), progress=seen.append)
    assert {(p.pass_index, p.passes) for p in seen} == {(1, 1)} and seen[-1].crop == seen[-1].crops, "stateless: one pass, to the last crop"


def test_out_of_gpu_memory_falls_back_step_by_step_and_says_so(tiny_checkpoint, monkeypatch):
    seg = Segmenter(str(tiny_checkpoint), device="cpu", bank="stateless", fast=True, sw_batch_size=2)
    real = seg._sliding_windows
    calls = []

    def flaky(*args, **kwargs):
        calls.append(seg.sw_batch_size)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "_sliding_windows", flaky)
    result = seg.segment(make_ct())
    assert calls == [2, 1], "the retry runs with half the crops per batch"
    assert result.report["fallbacks"] and "1 crop(s) per batch" in result.report["fallbacks"][0], "the user is told what changed"
    assert result.report["sw_batch_size"] == 1


def test_tta_warp_rotates_in_voxel_units_and_its_inverse_undoes_it():
    from FINESegmentationLib.inference import _tta_matrix, _warp

    shape = (8, 32, 64)  # in-plane crop that is not square: the rotation must still be a rotation in voxels
    x = torch.zeros(1, 1, *shape)
    x[0, 0, :, 16, 32 + 10] = 1.0  # a line 10 voxels to +x of the centre (voxel centres at 15.5/31.5)
    theta = _tta_matrix(90.0, 1.0, shape)
    rotated = _warp(x, theta)[0, 0, 4]
    y, xx = np.unravel_index(int(rotated.argmax()), rotated.shape)
    assert abs(xx - 31.5) < 1.5 and abs(abs(y - 15.5) - 10) < 1.5, "a point 10 voxels off-centre along x ends 10 voxels off along y"
    smooth = torch.linspace(0, 1, 64).expand(1, 2, 8, 32, 64).contiguous()
    for degrees, scale in [(10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1)]:
        theta = _tta_matrix(degrees, scale, shape)
        inverse = torch.cat([torch.linalg.inv(theta[:, :3]), torch.zeros(3, 1)], dim=1)
        back = _warp(_warp(smooth, theta), inverse)
        inner = (slice(None), slice(None), slice(None), slice(8, 24), slice(16, 48))
        assert torch.allclose(back[inner], smooth[inner], atol=0.02), f"{degrees} deg, x{scale} undone"


def test_tta_averages_transformed_crops_and_keeps_the_anatomy(tiny_checkpoint, monkeypatch):
    """Each TTA variant is one more forward per crop, and the average keeps the plain prediction's
    anatomy (mirrored crops, a previous TTA, put left organs on the right and scored 14% Dice)."""
    from FINESegmentationLib.data.phantoms import PhantomGenerator
    from FINESegmentationLib.evaluation import case_metrics
    from FINESegmentationLib.inference import TTA_VARIANTS

    case = PhantomGenerator(seed=11, in_plane=96).generate(0)
    # The slab holding both kidneys (a third of the scan): fewer crops, the same question.
    z = np.flatnonzero(np.isin(case.label.array, (2, 3)).any(axis=(1, 2)))
    k0, k1 = max(0, z[0] - 4), z[-1] + 5
    g = case.image.geometry
    origin = tuple(np.asarray(g.origin) + np.asarray(g.direction).reshape(3, 3) @ np.array([0.0, 0.0, k0 * g.spacing[2]]))
    slab = Geometry(g.spacing, origin, g.direction)
    image, label = Volume(case.image.array[k0:k1], slab), Volume(case.label.array[k0:k1], slab)
    plain = Segmenter("fine-tiny-phantom", device="cpu", bank="stateless", fast=True)
    tta = Segmenter("fine-tiny-phantom", device="cpu", bank="stateless", fast=True, tta=True)
    calls = {"n": 0}
    forward = tta.model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    monkeypatch.setattr(tta.model, "forward", counting)
    a = plain.segment(image)
    b = tta.segment(image)
    assert calls["n"] == len(TTA_VARIANTS) * a.report["crops_per_pass"] and b.report["tta"] is True
    dice_a = np.mean([m["dice"] for m in case_metrics(a.labels, label).values()])
    m_b = case_metrics(b.labels, label)
    assert np.mean([m["dice"] for m in m_b.values()]) > dice_a - 0.02, "TTA does not make the demo model worse"
    assert dice_a > 0.6, "the slab is segmented sensibly without TTA (organs cut by the slab edges score lower)"
    assert all(m_b[o]["swapped"] < 0.01 for o in ("right kidney", "left kidney") if o in m_b), "no side swapped"
