"""Class names, label mappings and colours of the benchmark datasets (facts of their releases, in index order).

Example:
    >>> from deeplab_keras.data.classes import CITYSCAPES_CLASSES, cityscapes_label_lut
    >>> len(CITYSCAPES_CLASSES), int(cityscapes_label_lut()[26])   # labelId 26 (car) is train id 13
    (19, 13)
"""
import numpy as np

# PASCAL VOC 2012: background and the 20 object classes.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# Cityscapes: the 19 evaluated classes (train ids 0..18) and their labelIds; every other labelId is ignored.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_NUM_LABEL_IDS = 34  # labelIds 0..33 (unlabeled .. bicycle); 255 also appears (license plate, -1)
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

# PASCAL-Context, 59 classes + background, alphabetical (the Detail-API conversion).
PASCAL_CONTEXT_CLASSES = ("background",) + tuple("""
    aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet car cat ceiling chair
    cloth computer cow cup curtain dog door fence floor flower food grass ground horse keyboard light motorbike
    mountain mouse person plate platform pottedplant road rock sheep shelves sidewalk sign sky snow sofa table
    track train tree truck tvmonitor wall water window wood""".split())
# Spellings of 59_labels.txt that differ from labels.txt (the original release's 459 names) and from ours.
PASCAL_CONTEXT_ALIASES = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}

PERSON_PART_CLASSES = ("background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs")

# COCO-Stuff: 182 ids (COCO's 91 thing ids, 11 of them unused, then 91 stuff ids); index = id - 1.
COCO_STUFF_CLASSES = tuple(name.replace("_", " ") for name in """
    person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign stop_sign
    parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack umbrella shoe
    eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard
    surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli
    carrot hot_dog pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv
    laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender book clock vase
    scissors teddy_bear hair_drier toothbrush hair_brush
    banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile cloth
    clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other floor-stone
    floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill house leaves
    light mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic platform
    playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow
    solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable wall-brick
    wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind
    window-other wood""".split())

assert len(PASCAL_CONTEXT_CLASSES) == 60 and len(COCO_STUFF_CLASSES) == 182 and len(CITYSCAPES_LABEL_IDS) == 19


def cityscapes_label_lut():
    """[256] int16: Cityscapes labelId -> train id (0..18), 255 for the ignored labelIds 0..33 and for 255, -1
    for values that are no labelId (an error when met)."""
    lut = np.full(256, -1, np.int16)
    lut[:CITYSCAPES_NUM_LABEL_IDS] = 255
    lut[255] = 255
    lut[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_LABEL_IDS))
    return lut


def cityscapes_train_to_label_ids():
    """[256] uint8: train id -> labelId (what the benchmark server reads); 255 and unknown ids -> 0 (unlabeled)."""
    lut = np.zeros(256, np.uint8)
    lut[:len(CITYSCAPES_LABEL_IDS)] = CITYSCAPES_LABEL_IDS
    return lut


def cityscapes_palette():
    """[256, 3] uint8: the official colours of the 19 train ids, black elsewhere."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    return palette


def voc_palette():
    """The PASCAL VOC colour map (the palette of VOC's own SegmentationClass PNGs) as [256, 3] uint8.

    Colour bits are the class index's bits interleaved: bit 3j+c of the index is bit 7-j of channel c.
    """
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = rgb
    return palette
