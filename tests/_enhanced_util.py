"""A valid Enhanced CT Image Storage instance for tests (multi-frame input).

:func:`write_enhanced_ct` writes an (F, H, W) HU volume as one Enhanced CT instance with
every module and functional group the IOD requires for ORIGINAL frames, so that
``dciodvfy`` reports no errors for it (the tests check that too).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from ldct_node.config import ENHANCED_CT_IMAGE_STORAGE
from ldct_node.dicom.io import file_meta_for, save_durably

_INTERCEPT = -1024.0


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def write_enhanced_ct(
    volume_hu: np.ndarray,
    path: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "LDCT enhanced",
    convolution_kernel: str = "B30f",
    pixel_spacing_mm: float = 0.8,
    slice_thickness_mm: float = 2.5,
) -> Path:
    """Write ``volume_hu`` (F, H, W) as one Enhanced CT instance at ``path``.

    Frames are axial, 2.5 mm apart, stored as signed 16-bit with a per-frame rescale
    (intercept -1024, slope 1) in the per-frame Pixel Value Transformation group, so that
    readers have to use the frame's own rescale.
    """
    volume = np.asarray(volume_hu, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"volume_hu: expected (F, H, W), got {volume.shape}")
    n_frames, rows, cols = volume.shape
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    stamp = date + time
    series_uid = series_uid or generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "enhanced"])
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient, study, series
    ds.PatientName = "Test^Enhanced"
    ds.PatientID = "TEST0002"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDescription = series_description
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # Enhanced General Equipment
    ds.Manufacturer = "TestVendor"
    ds.ManufacturerModelName = "Enhanced phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    # Enhanced CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = stamp
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # Multi-frame Functional Groups
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.NumberOfFrames = n_frames
    ds.AcquisitionContextSequence = Sequence([])
    # Multi-frame Dimension: one stack, ordered by position in it.
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209057,  # In-Stack Position Number
                FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
                DimensionDescriptionLabel="Stack position",
            )
        ]
    )
    # Shared functional groups
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence(
        [
            _item(
                PixelSpacing=[pixel_spacing_mm, pixel_spacing_mm], SliceThickness=slice_thickness_mm
            )
        ]
    )
    shared.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    shared.FrameAnatomySequence = Sequence(
        [
            _item(
                AnatomicRegionSequence=Sequence([_code("51185008", "SCT", "Chest")]),
                FrameLaterality="U",
            )
        ]
    )
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter=40, WindowWidth=400)])
    shared.IrradiationEventIdentificationSequence = Sequence(
        [_item(IrradiationEventUID=generate_uid())]
    )
    shared.CTImageFrameTypeSequence = Sequence(
        [
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ]
    )
    shared.CTAcquisitionTypeSequence = Sequence(
        [_item(AcquisitionType="SEQUENCED", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
    )
    shared.CTAcquisitionDetailsSequence = Sequence(
        [
            _item(
                DataCollectionDiameter=500.0,
                RevolutionTime=0.5,
                TotalCollimationWidth=40.0,
                SingleCollimationWidth=0.625,
                TableHeight=150.0,
                GantryDetectorTilt=0.0,
            )
        ]
    )
    shared.CTTableDynamicsSequence = Sequence(
        [_item(TableSpeed=0.0, TableFeedPerRotation=0.0, SpiralPitchFactor=0.0)]
    )
    shared.CTGeometrySequence = Sequence(
        [_item(DistanceSourceToDetector=1040.0, DistanceSourceToDataCollectionCenter=570.0)]
    )
    fov = cols * pixel_spacing_mm
    shared.CTReconstructionSequence = Sequence(
        [
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel=convolution_kernel,
                ConvolutionKernelGroup="SOFT_TISSUE",
                ReconstructionDiameter=fov,
                ReconstructionPixelSpacing=[pixel_spacing_mm, pixel_spacing_mm],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ]
    )
    shared.CTExposureSequence = Sequence(
        [
            _item(
                ExposureTimeInms=500.0,
                XRayTubeCurrentInmA=100.0,
                ExposureInmAs=50.0,
                ExposureModulationType="NONE",
                CTDIvol=3.0,
                CTDIPhantomTypeCodeSequence=Sequence(
                    [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
                ),
            )
        ]
    )
    shared.CTXRayDetailsSequence = Sequence(
        [
            _item(
                KVP=120.0,
                FocalSpots=[1.2],
                FilterType="BODY",
                FilterMaterial=["ALUMINUM"],
            )
        ]
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    # Per-frame functional groups
    frames = []
    x0 = -(cols - 1) * pixel_spacing_mm / 2.0
    y0 = -(rows - 1) * pixel_spacing_mm / 2.0
    for i in range(n_frames):
        z = i * slice_thickness_mm
        frame = Dataset()
        frame.FrameContentSequence = Sequence(
            [
                _item(
                    FrameAcquisitionNumber=1,
                    FrameReferenceDateTime=stamp,
                    FrameAcquisitionDateTime=stamp,
                    FrameAcquisitionDuration=500.0,
                    StackID="1",
                    InStackPositionNumber=i + 1,
                    DimensionIndexValues=[i + 1],
                )
            ]
        )
        frame.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[x0, y0, z])])
        frame.PixelValueTransformationSequence = Sequence(
            [_item(RescaleIntercept=_INTERCEPT, RescaleSlope=1.0, RescaleType="HU")]
        )
        frame.CTPositionSequence = Sequence(
            [
                _item(
                    TablePosition=-z,
                    ReconstructionTargetCenterPatient=[0.0, 0.0, z],
                    DataCollectionCenterPatient=[0.0, 0.0, z],
                )
            ]
        )
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    stored = np.clip(np.rint(volume - _INTERCEPT), -32768, 32767).astype("<i2")
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = file_meta_for(ds)
    return save_durably(ds, Path(path))
