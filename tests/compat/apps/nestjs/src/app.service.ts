import { Injectable } from '@nestjs/common';

@Injectable()
export class AppService {
  whoami(): { instance?: string; pid: number; node: string } {
    return { instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version };
  }
}
