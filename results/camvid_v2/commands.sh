/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/pretrain.yaml --run.output_dir outputs/camvid_v2/pretrain_r18
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/pretrain.yaml --run.output_dir outputs/camvid_v2/pretrain_r18 --resume latest
/work/main/.venv/bin/python scripts/distill.py --config scripts/configs/camvid_v2/teacher.yaml --run.output_dir outputs/camvid_v2/teacher --data.root ../shared/datasets/camvid
