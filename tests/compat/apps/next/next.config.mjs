/** @type {import('next').NextConfig} */
const nextConfig = {
  // .next/standalone/.../server.js, as the self-hosting docs show; `next start` serves the same build.
  output: 'standalone',
};

export default nextConfig;
