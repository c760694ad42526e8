"""The 14 CheXpert observations, in the order every label vector in the project uses."""

CHEXPERT_OBSERVATIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)

# The five observations most papers also report separately.
COMMON_OBSERVATIONS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")

OBSERVATION_INDEX = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}
