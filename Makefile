# The exact commands that make the shipped models in models/, plus test and lint.
# `make models` trains each run into runs/NAME (resumable: rerun after an interruption)
# and exports it as the next version of models/NAME. Override e.g. DATA=/path/to/datasets.

GANSENTRY ?= gansentry
DATA ?= ../shared/datasets
RUNS ?= runs
MODELS ?= models
DEVICE ?= auto
SEED ?= 0
DIGIT ?= 0

MNIST = --dataset mnist --protocol one-class-normal --normal-class $(DIGIT) --image-size 32
# The shipped EGBAD and MEMGAN flag inputs above the 80th percentile of validation-normal
# scores: of the quantiles tried on development digits 1 and 7 (seed 5), it gave the best
# F1 where anomalies are 90% of the inputs, as in MNIST one-class-normal (benchmarks/notes.md).
# Where anomalies are rare, 0.99 (the train command's default) raises fewer false alarms.
IMAGE_THRESHOLD = --threshold-quantile 0.8
KDD = --dataset kddcup99 --protocol kdd-dagmm
COMMON = --seed $(SEED) --data-root $(DATA) --device $(DEVICE) --resume

SHIPPED = mnist-ganomaly mnist-egbad mnist-memgan kdd-egbad kdd-memgan kdd-ganomaly \
	mnist-fanogan kdd-fanogan kdd-mmocgan mnist04-mmocgan

.PHONY: models $(SHIPPED) kdd-egbad-v1 reports test lint format

models: $(SHIPPED)

mnist-ganomaly:
	$(GANSENTRY) train --model ganomaly $(MNIST) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

# mnist-egbad/2 is this target: the image defaults' nearest-code score (knn), named here so
# that a run folder of the v1 defaults (the paper's fm score) is refused instead of resumed;
# mnist-egbad/1 was the same command with score_method=fm and the 99th percentile.
mnist-egbad:
	$(GANSENTRY) train --model egbad $(MNIST) $(COMMON) --out $(RUNS)/$@ $(IMAGE_THRESHOLD) \
		--hparam score_method=knn
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

# mnist-memgan/4 is this target with the image defaults of issue 15 (w_cycle 10, 6 epochs),
# exported from the training benchmark's run of the same training (runs/bench/
# mnist_memgan_0_seed0). /2 was the earlier defaults (w_cycle 1, 5 epochs) with the same
# threshold rule, /3 is /2 with anomaly maps, /1 is /2 at the 99th percentile.
mnist-memgan:
	$(GANSENTRY) train --model memgan $(MNIST) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA) \
		$(IMAGE_THRESHOLD)

# kdd-egbad/2 is this target: the current KDD defaults (nearest-code score). kdd-egbad/1,
# kept for clients that pin it, is the paper's pure BiGAN (lr 1e-5, no reconstruction term,
# 2 epochs, the cross-e score), seed-sensitive but top-20% F1 0.940 at seed 0 (commit
# 5a51a99); `make kdd-egbad-v1` retrains it with those flags.
kdd-egbad:
	$(GANSENTRY) train --model egbad $(KDD) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

kdd-egbad-v1:
	$(GANSENTRY) train --model egbad $(KDD) $(COMMON) --out $(RUNS)/$@ \
		--epochs 2 --lr 1e-5 --hparam w_rec=0 --hparam score_method=cross-e
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name kdd-egbad --data-root $(DATA)

# kdd-memgan/1 and kdd-ganomaly/1 were made with the earlier tabular defaults (add
# `--epochs 10 --hparam score_method=reconstruction`, resp. `--hparam score_method=latent`,
# to retrain them); these targets now train the nearest-code defaults, as the training
# benchmark's seed-0 runs runs/bench/kddcup99_{memgan,ganomaly}_all_seed0 did.
kdd-memgan:
	$(GANSENTRY) train --model memgan $(KDD) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

kdd-ganomaly:
	$(GANSENTRY) train --model ganomaly $(KDD) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

# f-AnoGAN and MMOC-GAN at their defaults (nearest-code scores on tables and, for
# f-AnoGAN, on images), each exported from the training benchmark's seed-0 run of the same
# training (runs/bench/<dataset>_<model>_<class>_seed0).
mnist-fanogan:
	$(GANSENTRY) train --model fanogan $(MNIST) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA) \
		$(IMAGE_THRESHOLD)

kdd-fanogan:
	$(GANSENTRY) train --model fanogan $(KDD) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

kdd-mmocgan:
	$(GANSENTRY) train --model mmocgan $(KDD) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA)

# The multi-modal model: digits 0-4 together are the normal class, 5-9 the anomalies (the
# training benchmark's mnist-multimodal plan), for MMOC-GAN's ten modes. Half the test
# digits are anomalies, so the threshold sits between the rare-anomaly 99th percentile and
# the 80th used where anomalies are 90% of the inputs: the 90th, set before any result.
# mnist04-mmocgan/3 is this target with MMOC-GAN's image defaults of stop 26 (spectrally
# normalised D, relative nearest code), trained by it; /2 was the benchmark's seed-0 run of
# the earlier defaults (--hparam d_spectral_norm=false --hparam knn_relative=0).
MNIST04 = --dataset mnist --protocol one-class-normal --normal-class 0,1,2,3,4 --image-size 32
mnist04-mmocgan:
	$(GANSENTRY) train --model mmocgan $(MNIST04) $(COMMON) --out $(RUNS)/$@
	$(GANSENTRY) export $(RUNS)/$@ --models-dir $(MODELS) --name $@ --data-root $(DATA) \
		--threshold-quantile 0.9

test:
	python -m pytest -q

lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

# The pictures in docs/reports: ROC, score histograms, reconstruction and anomaly-map grids,
# errors by test class (and MEMGAN's decoded memory units, which only a run folder has),
# from the shipped models.
reports:
	$(GANSENTRY) evaluate $(MODELS)/mnist-ganomaly/2 --data-root $(DATA) --report-dir docs/reports/mnist-ganomaly
	$(GANSENTRY) evaluate $(RUNS)/mnist-memgan --data-root $(DATA) --report-dir docs/reports/mnist-memgan
	$(GANSENTRY) evaluate $(MODELS)/kdd-egbad/2 --data-root $(DATA) --report-dir docs/reports/kdd-egbad
	$(GANSENTRY) evaluate $(MODELS)/kdd-memgan/1 --data-root $(DATA) --report-dir docs/reports/kdd-memgan
	$(GANSENTRY) evaluate $(MODELS)/kdd-ganomaly/1 --data-root $(DATA) --report-dir docs/reports/kdd-ganomaly
	$(GANSENTRY) evaluate $(MODELS)/mnist-fanogan/1 --data-root $(DATA) --report-dir docs/reports/mnist-fanogan
	$(GANSENTRY) evaluate $(MODELS)/kdd-fanogan/1 --data-root $(DATA) --report-dir docs/reports/kdd-fanogan
	$(GANSENTRY) evaluate $(RUNS)/kdd-mmocgan --data-root $(DATA) --report-dir docs/reports/kdd-mmocgan
	$(GANSENTRY) evaluate $(RUNS)/mnist04-mmocgan --data-root $(DATA) --report-dir docs/reports/mnist04-mmocgan
