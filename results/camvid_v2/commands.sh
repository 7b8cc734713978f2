/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/pretrain.yaml --run.output_dir outputs/camvid_v2/pretrain_r18
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/teacher.yaml --run.output_dir outputs/camvid_v2/teacher --data.root ../shared/datasets/camvid
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/teacher --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/teacher --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed0 --data.root ../shared/datasets/camvid --run.seed 0
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed0 --data.root ../shared/datasets/camvid --run.seed 0
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed0 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed1 --data.root ../shared/datasets/camvid --run.seed 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed1 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed2 --data.root ../shared/datasets/camvid --run.seed 2
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed2 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k3_m1/seed0 --data.root ../shared/datasets/camvid --run.seed 0 --fotf.kappa 3 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed0 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k10_m1/seed0 --data.root ../shared/datasets/camvid --run.seed 0 --fotf.kappa 10 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k10_m1/seed0 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k10_m10/seed0 --data.root ../shared/datasets/camvid --run.seed 0 --fotf.kappa 10 --fotf.m 10
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed0 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k3_m1/seed1 --data.root ../shared/datasets/camvid --run.seed 1 --fotf.kappa 3 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed1 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed1 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k3_m1/seed2 --data.root ../shared/datasets/camvid --run.seed 2 --fotf.kappa 3 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed2 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed2 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed3 --data.root ../shared/datasets/camvid --run.seed 3
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed3 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k3_m1/seed3 --data.root ../shared/datasets/camvid --run.seed 3 --fotf.kappa 3 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed3 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed3 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed4 --data.root ../shared/datasets/camvid --run.seed 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k10_m10/seed0 --data.root ../shared/datasets/camvid --run.seed 0 --fotf.kappa 10 --fotf.m 10
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd.yaml --run.output_dir outputs/camvid_v2/kd/seed4 --data.root ../shared/datasets/camvid --run.seed 4 --resume latest
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed4 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/kd_fotf.yaml --run.output_dir outputs/camvid_v2/kd_fotf_k3_m1/seed4 --data.root ../shared/datasets/camvid --run.seed 4 --fotf.kappa 3 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed4 --dataset camvid --root ../shared/datasets/camvid --split validation --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --batch_size 4 --mc_samples 5
/work/main/.venv/bin/python scripts/fotf_mechanism.py --model outputs/camvid_v2/kd_fotf_k3_m1/seed4 --dataset camvid --root ../shared/datasets/camvid --split test --eval_size 180 240 --kappa 3 --m 1 --mc_samples 5
