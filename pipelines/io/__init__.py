"""Readers and writers: fastMRI HDF5, Calgary-Campinas, ISMRMRD/MRD, DICOM, DICOM-SEG, NIfTI.

One module per format. Every writer is atomic (:mod:`kscan.pipelines.atomic`); every reader
raises :class:`kscan.errors.FileFormatError` naming the file and the problem.
"""
