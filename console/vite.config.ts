import { defineConfig } from "vite";

// Served by `avatarq api` under /console/ (producers/console.py); assets land in dist/assets.
export default defineConfig({
  base: "/console/",
  // livekit-client is most of the ~580 kB bundle; one file is fine for an operator page.
  build: { outDir: "dist", assetsDir: "assets", emptyOutDir: true, chunkSizeWarningLimit: 800 },
});
