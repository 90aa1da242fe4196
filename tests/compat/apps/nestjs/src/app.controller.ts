import { Controller, Get } from '@nestjs/common';
import { AppService } from './app.service';

@Controller()
export class AppController {
  constructor(private readonly appService: AppService) {}

  @Get()
  whoami(): { instance?: string; pid: number; node: string } {
    return this.appService.whoami();
  }
}
