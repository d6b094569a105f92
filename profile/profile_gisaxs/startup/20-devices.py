"""Part 2: devices. Simulated Pilatus + sample_x motor unless GISAXS_SIMULATED=0 (then load
the real ones in a later startup file, e.g. 25-hardware.py, defining ``pilatus``/``sample_x``)."""
SIMULATED = os.environ.get("GISAXS_SIMULATED", "1").lower() not in ("0", "false", "no")
if SIMULATED:
    from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors
    from gisaxs_bluesky.sim.scene import default_scene

    scene = default_scene()
    (sample_x,) = make_motors("sample_x", sample_x=5.0)
    DETECTOR_DIR = Path(os.environ.get("GISAXS_DETECTOR_DIR", CATALOG_DIR / "detector"))
    pilatus = make_gisaxs_detector(DETECTOR_DIR, scene.frame, [sample_x], name="pilatus",
                                   shape=(1043, 981), dtype=np.int32)
    print(f"simulated devices: pilatus (files in {DETECTOR_DIR}), sample_x (0-40 mm)")
