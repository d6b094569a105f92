#!/usr/bin/env bash
# The small q-grid model run of issue 16 (2 CPU cores): simulate across instruments, train,
# evaluate on the held-out set-ups with the log-block-means + PCA + k-means baseline alongside.
set -euo pipefail
out=${1:-runs/qgrid}
mkdir -p "$out"
# each sample on two instruments, so that the consistency loss asks for invariance to geometry
gisaxs-bluesky simulate "$out/train_q.h5" --identities 600 --frames-per-identity 4 --seed 0 \
    --instruments train --input-mode qgrid --instruments-per-identity 2 --workers 2
gisaxs-bluesky simulate "$out/val_q.h5" --identities 100 --frames-per-identity 4 --seed 1 \
    --instruments train --input-mode qgrid --workers 2
gisaxs-bluesky simulate "$out/cross_q.h5" --identities 64 --frames-per-identity 4 --seed 3 \
    --instruments train --input-mode qgrid --instruments-per-identity 2 --workers 2
gisaxs-bluesky simulate "$out/clean_q.h5" --identities 100 --frames-per-identity 2 --seed 2 \
    --p-kind 0 --instruments train --input-mode qgrid --workers 2
gisaxs-bluesky train --data "$out/train_q.h5" --val "$out/val_q.h5" \
    --calibration "$out/clean_q.h5" --epochs 40 --noise-refit-epochs 10 \
    --align-recon --coverage-dropout 0.5 --w-consistency 4 \
    --name gisaxs-dae-qgrid --out "$out/dae_q.pt"
gisaxs-bluesky evaluate --model "$out/dae_q.pt" --instruments --identities 10 \
    --frames-per-identity 6 > "$out/evaluate_instruments.json"
gisaxs-bluesky evaluate --model "$out/dae_q.pt" --invariance "$out/cross_q.h5" \
    > "$out/evaluate_invariance.json"
