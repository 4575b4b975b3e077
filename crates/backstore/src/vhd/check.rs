//! `ironlun vhd check`: a read-only consistency check of a VHD image (semantics.md §4.3-§4.4).
