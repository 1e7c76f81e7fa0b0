"""Static checks of the Slicer module and the extension's build files (no Slicer, no Qt needed).

The module file and its Refine section's widget import qt/ctk/slicer and cannot run here, so these
tests read them: every widget they use must exist in the .ui file, every parameter bound by
``connectGui`` must exist in the parameter node, the extension build must ship
every engine file, and the extension's description files must agree.
"""
import ast
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "FINESegmentation"
MODULE_FILE = MODULE_DIR / "FINESegmentation.py"
REFINE_DIR = MODULE_DIR / "FINESegmentationRefine"
REFINE_WIDGET = REFINE_DIR / "widget.py"
ENGINE_DIR = MODULE_DIR / "FINESegmentationLib"
UI_FILE = ROOT / "Resources" / "UI" / "FINESegmentation.ui"
S4EXT = ROOT / "FINESegmentation.s4ext"
CATALOG_ENTRY = ROOT / "FINESegmentation.json"
REPOSITORY_FILE_URL = re.compile(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(\S+)")


def _ui_widgets():
    """{objectName: class} of every widget in the .ui file, and {SlicerParameterName: (objectName, class)}."""
    root = ET.parse(UI_FILE).getroot()
    widgets, bound = {}, {}
    for widget in root.iter("widget"):
        widgets[widget.get("name")] = widget.get("class")
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = (widget.get("name"), widget.get("class"))
    return widgets, bound


def _module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _widget_trees():
    """The module file and the Refine section's widget: the files that read ``self.ui``."""
    return [_module_tree(), ast.parse(REFINE_WIDGET.read_text(encoding="utf-8"))]


def _ui_names_used(tree):
    """Every ``<something>.ui.<name>`` the module file reads."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
    }


def _class(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _parameters(tree):
    """{name: annotation source} of the @parameterNodeWrapper class."""
    cls = _class(tree, "FINESegmentationParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def _cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert block, f"{path.name} sets {variable}"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def _s4ext() -> dict[str, str]:
    fields = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def _cmake_extension_settings() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text))


# --------------------------------------------------------------------------- module file and .ui


def test_module_files_compile(tmp_path):
    for path in [MODULE_FILE, *sorted(REFINE_DIR.glob("*.py"))]:
        py_compile.compile(str(path), cfile=str(tmp_path / f"{path.stem}.pyc"), doraise=True)


def test_every_widget_the_module_uses_exists_in_the_ui_file():
    widgets, _ = _ui_widgets()
    module, refine = (_ui_names_used(tree) for tree in _widget_trees())
    assert module and refine, "the module and its Refine section read their widgets from self.ui"
    missing = sorted((module | refine) - set(widgets))
    assert not missing, f"widgets used in FINESegmentation.py or FINESegmentationRefine/widget.py but absent from {UI_FILE.name}: {missing}"


def test_every_bound_widget_maps_to_a_parameter_with_a_fitting_type():
    _, bound = _ui_widgets()
    parameters = _parameters(_module_tree())
    assert set(bound) <= set(parameters), f"SlicerParameterName values without a parameter: {sorted(set(bound) - set(parameters))}"
    for name, (widget, cls) in bound.items():
        annotation = parameters[name]
        if cls == "qMRMLNodeComboBox":
            assert annotation.startswith("vtkMRML"), f"{widget} shows nodes, so {name} must be a node type"
        elif cls == "QComboBox":
            assert "Choice(" in annotation, f"{widget} is a combo box, so {name} needs a Choice annotation"
        elif cls == "QCheckBox":
            assert annotation == "bool", f"{widget} is a check box, so {name} must be a bool"
        elif cls == "QSpinBox":
            assert annotation.startswith(("int", "Annotated[int")), f"{widget} is a spin box, so {name} must be an int"
        elif cls == "ctkSliderWidget":
            assert annotation.startswith(("float", "Annotated[float")), f"{widget} is a slider, so {name} must be a float"
        else:
            pytest.fail(f"{widget} ({cls}) has no parameter node connector here")
    assert {"inputVolume", "outputSegmentation", "quality", "bank", "tta"} <= set(bound), "settings live in the scene"


def test_the_ui_offers_what_the_issue_asks_for():
    widgets, _ = _ui_widgets()
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox", "loadCheckpointButton": "QPushButton",
        "deviceComboBox": "QComboBox", "qualityComboBox": "QComboBox", "bankComboBox": "QComboBox", "ttaCheckBox": "QCheckBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox", "segmentButton": "QPushButton", "progressBar": "QProgressBar",
        "statusLabel": "QLabel", "show3DButton": "qMRMLSegmentationShow3DButton",
        # the Attention section
        "attentionPointSelector": "qMRMLNodeComboBox", "attentionPlaceWidget": "qSlicerMarkupsPlaceWidget",
        "attentionStageComboBox": "QComboBox", "attentionBlockSpinBox": "QSpinBox", "attentionOpacitySlider": "ctkSliderWidget",
        "showAttentionButton": "QPushButton", "saveAttentionButton": "QPushButton", "attentionStatusLabel": "QLabel",
        # the Refine section
        "refineCollapsibleButton": "ctkCollapsibleButton", "refineSegmentSelector": "qMRMLSegmentSelectorWidget",
        "refinePositivePlaceWidget": "qSlicerMarkupsPlaceWidget", "refineNegativePlaceWidget": "qSlicerMarkupsPlaceWidget",
        "refineMemoryCheckBox": "QCheckBox", "refineStartButton": "QPushButton", "refineUndoButton": "QPushButton",
        "refineResetButton": "QPushButton", "refineStatusLabel": "QLabel",
        "refineRefinerComboBox": "QComboBox", "refineOrganComboBox": "QComboBox", "refineBoxPlaceWidget": "qSlicerMarkupsPlaceWidget",
        # Segment's refine-all switch, in the Advanced area
        "refineAllCheckBox": "QCheckBox",
    }
    assert {name: widgets.get(name) for name in expected} == expected


def test_the_refine_all_switch_is_stored_on_by_default_passed_to_the_engine_and_states_its_cost():
    root = ET.parse(UI_FILE).getroot()
    advanced = next(w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    switch = next((w for w in advanced.iter("widget") if w.get("name") == "refineAllCheckBox"), None)
    assert switch is not None, "the switch sits in Segment's Advanced area"
    assert switch.findtext("property[@name='SlicerParameterName']/string") == "refineAll"
    assert "s per slice" in switch.findtext("property[@name='toolTip']/string"), "its tooltip says the CPU cost README measured"
    assert switch.findtext("property[@name='checked']/bool") == "true", "the box is drawn checked"
    assert _parameters(_module_tree())["refineAll"] == "bool" and "refineAll: bool = True" in MODULE_FILE.read_text(), "on by default"
    calls = [n for n in ast.walk(_class(_module_tree(), "FINESegmentationWidget")) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "startSegmentation"]
    assert any(ast.unparse(k.value) == "p.refineAll and p.quality != 'fast'" for c in calls for k in c.keywords if k.arg == "refine_all"), \
        "Segment passes the switch to the engine's refine_all, and the fast quality skips it (as fine-seg segment --fast)"


def test_the_tta_switch_is_stored_on_by_default_and_the_fast_quality_skips_it():
    root = ET.parse(UI_FILE).getroot()
    switch = next((w for w in root.iter("widget") if w.get("name") == "ttaCheckBox"), None)
    assert switch is not None and switch.findtext("property[@name='SlicerParameterName']/string") == "tta"
    assert switch.findtext("property[@name='checked']/bool") == "true", "the box is drawn checked"
    assert "tta: bool = True" in MODULE_FILE.read_text(), "on by default"
    calls = [n for n in ast.walk(_class(_module_tree(), "FINESegmentationWidget")) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "startSegmentation"]
    assert any(ast.unparse(k.value) == "p.tta and p.quality != 'fast'" for c in calls for k in c.keywords if k.arg == "tta"), \
        "Segment passes the switch to the engine's tta, and the fast quality skips it (as fine-seg segment --fast)"


def test_the_logic_offers_the_documented_console_api():
    logic = _class(_module_tree(), "FINESegmentationLogic")
    methods = {n.name: [a.arg for a in n.args.args + n.args.kwonlyargs] for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert methods["segment"][:3] == ["self", "volumeNode", "segmentationNode"]
    assert {"model", "device", "progress", "cancel"} <= set(methods["segment"])
    assert methods["segmentFiles"][:3] == ["self", "inputPaths", "outputDir"]
    assert "FINESegmentationTest" in {n.name for n in _module_tree().body if isinstance(n, ast.ClassDef)}
    assert methods["refineStart"][:4] == ["self", "volumeNode", "segmentationNode", "segmentId"]
    assert methods["refineClick"][:4] == ["self", "session", "points", "labels"] and "useMemory" in methods["refineClick"]
    assert methods["refineBox"][:3] == ["self", "session", "box"] and "useMemory" in methods["refineBox"]
    assert "refiner" in methods["refineStart"] and "refineAll" in methods["segment"] and "refineAll" in methods["segmentFiles"]
    assert methods["undoRefineClick"] == ["self", "session"]


def test_the_refine_section_states_its_shortcuts_and_its_scene_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    tooltips = {w.get("name"): w.findtext("property[@name='toolTip']/string") or "" for w in root.iter("widget")}
    for name, key in (("refinePositivePlaceWidget", "A"), ("refineNegativePlaceWidget", "D"), ("refineUndoButton", "Z")):
        assert f"Shortcut: {key}." in tooltips[name], f"{name}'s tooltip names its shortcut {key}"
    widget = REFINE_WIDGET.read_text(encoding="utf-8")
    assert 'REFINE_SHORTCUTS = {"positive": "A", "negative": "D", "undo": "Z"}' in widget, "tooltips and code agree"
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert {"refineSegmentSelector", "refinePositivePlaceWidget", "refineNegativePlaceWidget", "refineBoxPlaceWidget"} <= receivers


def test_the_refine_logic_needs_no_qt_so_it_runs_on_slicer_core():
    for path in (REFINE_DIR / "__init__.py", REFINE_DIR / "logic.py"):
        imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert not imported & {"qt", "ctk"}, f"{path.name} imports Qt"


def test_only_the_mrml_file_of_the_engine_imports_slicer_vtk_or_qt():
    gui_modules = {"slicer", "vtk", "qt", "ctk"}
    offenders = []
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n.split(".")[0] in gui_modules for n in names) and path.name != "mrml.py":
                offenders.append(f"{path.relative_to(MODULE_DIR)}: {names}")
    assert not offenders, f"only FINESegmentationLib/mrml.py may know Slicer: {offenders}"


# --------------------------------------------------------------------------- extension build files


def test_the_module_build_ships_every_engine_and_refine_section_file():
    scripts = _cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    present = {str(p.relative_to(MODULE_DIR)) for d in (ENGINE_DIR, REFINE_DIR) for p in d.rglob("*.py")} | {"${MODULE_NAME}.py"}
    assert not present - set(scripts), f"module files missing from SCRIPTS in FINESegmentation/CMakeLists.txt: {sorted(present - set(scripts))}"
    assert not set(scripts) - present, f"SCRIPTS lists files that do not exist: {sorted(set(scripts) - present)}"


def test_the_module_build_ships_its_resources_one_folder_up_as_in_the_checkout():
    resources = _cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    assert all(r.startswith("../Resources/") for r in resources), "Resources sit one folder above the module folder"
    for resource in resources:
        path = (MODULE_DIR / resource.replace("${MODULE_NAME}", "FINESegmentation")).resolve()
        assert path.is_file(), f"{resource} exists"
    assert "WITH_GENERIC_TESTS" in (MODULE_DIR / "CMakeLists.txt").read_text()


def test_the_icon_is_a_128_pixel_png():
    header = (ROOT / "Resources" / "Icons" / "FINESegmentation.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (128, 128)


def test_s4ext_has_every_field_the_extensions_index_needs():
    fields = _s4ext()
    required = ["scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
                "iconurl", "screenshoturls", "description", "status", "enabled"]
    assert {k: bool(fields.get(k)) for k in required} == {k: True for k in required}, "every field present and filled in"
    assert fields["category"] == "Segmentation" and "PyTorch" in fields["depends"].split() and fields["enabled"] == "1"


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    # Properties of slicer-extension-catalog-entry-schema-v1.0.1 (additionalProperties is false there).
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_type"] in ("git", "local") and entry["tier"] in (1, 3, 5) and isinstance(entry["enabled"], bool)


def test_s4ext_json_and_cmake_describe_the_same_extension():
    fields, entry, cmake = _s4ext(), json.loads(CATALOG_ENTRY.read_text(encoding="utf-8")), _cmake_extension_settings()
    assert fields["scmurl"] == entry["scm_url"] and fields["scmrevision"] == entry["scm_revision"]
    assert fields["build_subdirectory"] == entry["build_subdirectory"] == cmake["BUILD_SUBDIRECTORY"]
    for key in ("homepage", "category", "iconurl", "screenshoturls", "description", "contributors", "status", "depends"):
        assert fields[key] == cmake[key.upper()], f"{key} agrees with CMakeLists.txt"
    assert entry["scm_url"].removesuffix(".git") == fields["homepage"]


def test_icon_and_screenshot_urls_point_at_files_in_the_repository():
    fields = _s4ext()
    for url in [fields["iconurl"], *fields["screenshoturls"].split()]:
        match = REPOSITORY_FILE_URL.fullmatch(url)
        assert match and (ROOT / match.group(1)).is_file(), f"{url} points at a file of this repository"
