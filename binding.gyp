{
  "targets": [
    {
      "target_name": "livemig",
      "sources": [
        "native/addon.cc",
        "native/region.cc",
        "native/tracking.cc",
        "native/pages.cc",
        "native/fdpass.cc",
        "native/content.cc",
        "native/pagehash.cc",
        "native/wire.cc",
        "native/encode.cc",
        "native/postcopy.cc",
        "native/postcopy_dest.cc",
        "native/postcopy_source.cc",
        "native/sched.cc",
        "native/guestctl.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc!": ["-fno-exceptions", "-O3"],
      "cflags_cc": ["-fexceptions", "-O2", "-std=c++17", "-Wall", "-Wextra"],
      "conditions": [["OS!='linux'", { "type": "none" }]]
    }
  ]
}
