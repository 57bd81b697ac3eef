import { defineConfig } from "vite";

// Served by `avatarq api` under /console/ (producers/console.py). The build goes inside the
// producers package, so an installed wheel (the Docker image) carries it as package data.
export default defineConfig({
  base: "/console/",
  // livekit-client is most of the ~580 kB bundle; one file is fine for an operator page.
  build: {
    outDir: "../producers/console_dist",
    assetsDir: "assets",
    emptyOutDir: true,
    chunkSizeWarningLimit: 800,
  },
});
