{
  "target_defaults": {
    "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "native"],
    "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED"],
    "cflags_cc!": ["-fno-exceptions", "-O3"],
    "cflags_cc": ["-fexceptions", "-O2", "-std=c++17", "-Wall", "-Wextra"],
    "conditions": [["OS!='linux'", { "type": "none" }]]
  },
  "targets": [
    {
      "target_name": "livemig",
      "dependencies": ["livemig_guest_lib"],
      "sources": [
        "native/addon.cc",
        "native/errors.cc",
        "native/io/socket.cc",
        "native/io/aead.cc",
        "native/io/records.cc",
        "native/io/link.cc",
        "native/io/ktls.cc",
        "native/region/region.cc",
        "native/region/pages.cc",
        "native/region/file_io.cc",
        "native/region/read_path.cc",
        "native/disk/disk_io.cc",
        "native/disk/precontent.cc",
        "native/disk/written_bitmap.cc",
        "native/tracking/tracking.cc",
        "native/codec/pagehash.cc",
        "native/codec/encode.cc",
        "native/wire/format.cc",
        "native/wire/send_pages.cc",
        "native/wire/receive_pages.cc",
        "native/wire/wire.cc",
        "native/postcopy/postcopy.cc",
        "native/postcopy/dest.cc",
        "native/postcopy/disk_waits.cc",
        "native/postcopy/source.cc",
        "native/process/fdpass.cc",
        "native/process/sched.cc",
        "native/process/guest_control.cc"
      ]
    },
    {
      "target_name": "livemig_guest_lib",
      "type": "static_library",
      "sources": ["native/guest/livemig_guest.c"],
      "cflags_c": ["-std=c11", "-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "livemig_guest",
      "dependencies": ["livemig_guest_lib"],
      "sources": [
        "native/refguest/addon.cc",
        "native/errors.cc",
        "native/refguest/content.cc",
        "native/refguest/gate.cc",
        "native/refguest/disk.cc",
        "native/guest/example/example_disk.c",
        "native/process/sched.cc"
      ],
      "include_dirs": ["native/guest"],
      "cflags_c": ["-std=c11", "-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "c_guest",
      "type": "executable",
      "dependencies": ["livemig_guest_lib"],
      "include_dirs": ["native/guest"],
      "sources": ["native/guest/example/c_guest.c", "native/guest/example/example_disk.c"],
      "cflags_c": ["-std=c11", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "lmg_lifecycle",
      "type": "executable",
      "dependencies": ["livemig_guest_lib"],
      "include_dirs": ["native/guest"],
      "sources": ["native/guest/test/lmg_lifecycle.c"],
      "cflags_c": ["-std=c11", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "livemig_qemu_preload",
      "type": "shared_library",
      "product_name": "livemig_qemu_preload",
      "sources": ["native/qemu/preload.c", "native/guest/livemig_guest.c"],
      "include_dirs": ["native/guest"],
      "cflags": ["-fPIC", "-fvisibility=hidden"],
      "cflags_c": ["-std=gnu11", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-ldl", "-lpthread"]
    },
    {
      "target_name": "read_floor",
      "type": "executable",
      "sources": ["bench/native/read_floor.c"],
      "cflags_c": ["-std=gnu11", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "raw_streams",
      "type": "executable",
      "sources": ["bench/native/raw_streams.c"],
      "cflags_c": ["-std=gnu11", "-O2", "-Wall", "-Wextra"],
      "libraries": ["-lpthread"]
    }
  ]
}
