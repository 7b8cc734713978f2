/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/teacher.yaml --run.output_dir outputs/camvid_cpu/teacher
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/teacher --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/ce_fotf_kappa1_m1 --fotf.kappa 1 --fotf.m 1 --run.seed 100
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/sweep/ce_fotf_kappa1_m1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/ce_fotf_kappa3_m1 --fotf.kappa 3 --fotf.m 1 --run.seed 100
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/sweep/ce_fotf_kappa3_m1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/ce_fotf_kappa7_m1 --fotf.kappa 7 --fotf.m 1 --run.seed 100
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/sweep/ce_fotf_kappa7_m1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/kd_fotf_kappa1_m1 --fotf.kappa 1 --fotf.m 1 --run.seed 100
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/sweep/kd_fotf_kappa1_m1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/kd_fotf_kappa5_m1 --fotf.kappa 5 --fotf.m 1 --run.seed 100
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/sweep/kd_fotf_kappa5_m1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/kd_fotf_kappa10_m10 --fotf.kappa 10 --fotf.m 10 --run.seed 100
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/sweep/kd_fotf_kappa10_m10 --fotf.kappa 10 --fotf.m 10 --run.seed 100
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce.yaml --run.output_dir outputs/camvid_cpu/ce/seed0 --run.seed 0
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/ce_fotf/seed0 --run.seed 0 --fotf.kappa 7 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce_fotf/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd.yaml --run.output_dir outputs/camvid_cpu/kd/seed0 --run.seed 0
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/kd_fotf/seed0 --run.seed 0 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd_fotf/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce.yaml --run.output_dir outputs/camvid_cpu/ce/seed1 --run.seed 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/ce_fotf/seed1 --run.seed 1 --fotf.kappa 7 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce_fotf/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd.yaml --run.output_dir outputs/camvid_cpu/kd/seed1 --run.seed 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/kd_fotf/seed1 --run.seed 1 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd_fotf/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce.yaml --run.output_dir outputs/camvid_cpu/ce/seed2 --run.seed 2
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/ce_fotf.yaml --run.output_dir outputs/camvid_cpu/ce_fotf/seed2 --run.seed 2 --fotf.kappa 7 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/ce_fotf/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd.yaml --run.output_dir outputs/camvid_cpu/kd/seed2 --run.seed 2
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd.yaml --run.output_dir outputs/camvid_cpu/kd/seed2 --run.seed 2 --resume latest
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --run.output_dir outputs/camvid_cpu/kd_fotf/seed2 --run.seed 2 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/kd_fotf/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd.yaml --run.output_dir outputs/camvid_cpu/cirkd/seed0 --run.seed 0
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd_fotf.yaml --run.output_dir outputs/camvid_cpu/cirkd_fotf/seed0 --run.seed 0 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd_fotf/seed0 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd.yaml --run.output_dir outputs/camvid_cpu/cirkd/seed1 --run.seed 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd_fotf.yaml --run.output_dir outputs/camvid_cpu/cirkd_fotf/seed1 --run.seed 1 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd_fotf/seed1 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd.yaml --run.output_dir outputs/camvid_cpu/cirkd/seed2 --run.seed 2
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_cpu/cirkd_fotf.yaml --run.output_dir outputs/camvid_cpu/cirkd_fotf/seed2 --run.seed 2 --fotf.kappa 1 --fotf.m 1
/work/main/.venv/bin/python scripts/evaluate.py --model outputs/camvid_cpu/cirkd_fotf/seed2 --dataset camvid --root ../shared/datasets/camvid --eval_size 180 240 --batch_size 4
