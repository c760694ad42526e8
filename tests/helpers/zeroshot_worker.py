"""Fake downstream data sets for tests/test_zeroshot.py (the datasets.downstream contract, drawn
from a seed), and, run as a script under torchrun, main_zeroshot.py on them:
``zeroshot_worker.py ARGS...`` = ``main_zeroshot.py ARGS...`` with the fakes."""
import sys

import torch

import engine.zeroshot
import main_zeroshot

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
PHRASES = [("small right pleural effusion", "Pleural effusion"), ("left lower lobe opacity", "Opacity"),
           ("there is cardiomegaly", "Cardiomegaly")]


class FakeDownstream(torch.utils.data.Dataset):
    def __init__(self, task: str, split: str, size: int, n: int = 10):
        self.task, self.size, self.n = task, size, n
        self.seed = {"train": 0, "val": 1, "test": 2}[split] * 100 + len(task)
        self.label_names = {"nih": ["Atelectasis", "Cardiomegaly", "Hernia"], "rsna": ["Pneumonia"],
                            "chexpert5x200": FIVE, "mscxr": sorted({c for _, c in PHRASES})}[task]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        item = {"image": torch.randn(1, self.size, self.size, generator=g), "id": f"{self.task}-{i}"}
        if self.task in ("nih", "rsna"):
            labels = (torch.rand(len(self.label_names), generator=g) < 0.5).float()
            labels[0] = float(i % 2)  # both classes present
            item["labels"] = labels
        elif self.task == "chexpert5x200":
            item["labels"] = torch.nn.functional.one_hot(torch.tensor(i % 5), 5).float()
            rest = ("the lungs are clear", "no pneumothorax", "normal heart size")[i // 5 % 3]
            item["caption"] = f"there is {FIVE[i % 5].lower()}. {rest}."  # unique: no tied ranks
        else:
            phrase, label = PHRASES[i % len(PHRASES)]
            mask = torch.zeros(self.size, self.size)
            r, c = (int(v) for v in torch.randint(0, self.size // 2, (2,), generator=g))
            mask[r:r + self.size // 3, c:c + self.size // 3] = 1
            item.update(phrase=phrase, label=label, box_mask=mask)
        return item


def fake_build(task, root, split, image_size, **kwargs):
    return FakeDownstream(task, split, image_size)


def use_fakes() -> None:
    engine.zeroshot.build_downstream = fake_build


if __name__ == "__main__":
    use_fakes()
    main_zeroshot.main(main_zeroshot.get_args_parser().parse_args(sys.argv[1:]))
